#!/usr/bin/env python3
"""Publish JSON lines to a RabbitMQ exchange with pika and publisher
confirms, the way a careful Python publisher does; print the rate.

usage: pika_publish.py AMQP_URL EXCHANGE FILE
FILE holds lines of `ROUTING_KEY<TAB>JSON`.
"""
import sys
import time

import pika


def main() -> None:
    url, exchange, path = sys.argv[1:4]
    with open(path, "rb") as f:
        records = [line.rstrip(b"\n").split(b"\t", 1) for line in f if line.strip()]
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.confirm_delivery()
    props = pika.BasicProperties(content_type="application/json", delivery_mode=2)
    start = time.perf_counter()
    for key, body in records:
        # With confirms on, basic_publish blocks until the broker confirms.
        ch.basic_publish(exchange, key.decode(), body, props, mandatory=True)
    elapsed = time.perf_counter() - start
    conn.close()
    print(f"{len(records)} {elapsed:.6f}")


if __name__ == "__main__":
    main()
