#!/usr/bin/env python3
"""Produce JSON records to a Kafka topic with confluent-kafka (librdkafka
under Python) using the bridge's settings (acks=all, idempotence, the same
key and headers), waiting for every delivery report; print the rate. The
first 1,000 records are produced once untimed first, so that connecting
and getting a producer id are not timed (as for the other clients).

usage: confluent_produce.py BOOTSTRAP TOPIC FILE [COMPRESSION]
FILE holds lines of `KEY<TAB>ID<TAB>NAME<TAB>NAMESPACE<TAB>TOPIC<TAB>JSON`.
"""
import resource
import sys
import time

from confluent_kafka import Producer


def main() -> None:
    bootstrap, topic, path = sys.argv[1:4]
    # The sink's default unless given.
    compression = sys.argv[4] if len(sys.argv) > 4 else "lz4"
    with open(path, "rb") as f:
        records = [line.rstrip(b"\n").split(b"\t", 5) for line in f if line.strip()]
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
            "compression.type": compression,
            "message.timeout.ms": 30000,
        }
    )
    failed = []

    def report(err, _msg):
        if err is not None:
            failed.append(err)

    produce(producer, topic, records[:1000], report)
    producer.flush(60)
    if failed:
        sys.exit(f"{len(failed)} warm-up deliveries failed, first: {failed[0]}")
    start = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    produce(producer, topic, records, report)
    producer.flush(60)
    elapsed = time.perf_counter() - start
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    if failed:
        sys.exit(f"{len(failed)} deliveries failed, first: {failed[0]}")
    print(f"{len(records)} {elapsed:.6f} {cpu:.6f}")


def produce(producer, topic, records, report) -> None:
    for key, ident, name, namespace, logical, body in records:
        headers = [
            ("id", ident),
            ("name", name),
            ("namespace", namespace),
            ("topic", logical),
            ("content-type", b"application/json"),
        ]
        while True:
            try:
                producer.produce(topic, body, key, headers=headers, on_delivery=report)
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)


if __name__ == "__main__":
    main()
