#!/usr/bin/env python3
"""Independent witness for evbridge's CloudEvents output.

Reads messages with a client nobody in this project wrote (confluent-kafka,
pika) and decodes each with the CloudEvents Python SDK's own protocol
bindings, printing one JSON line per decoded event. A message the SDK cannot
decode makes the script fail.

    cloudevents_decode.py kafka BOOTSTRAP TOPIC COUNT
    cloudevents_decode.py amqp URL QUEUE COUNT
"""

import json
import sys
import time

from cloudevents.core.formats.json import JSONFormat


def describe(event, mode):
    attrs = event.get_attributes()
    out = {
        "mode": mode,
        "extensions": {},
        "data": event.get_data(),
    }
    for name, value in attrs.items():
        if name == "time":
            value = value.isoformat()
        if name in ("specversion", "id", "source", "type", "time", "subject", "datacontenttype"):
            out[name] = value
        else:
            out["extensions"][name] = value
    return out


def kafka(bootstrap, topic, count):
    from confluent_kafka import Consumer, TopicPartition
    from cloudevents.core.bindings import kafka as binding

    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": "cloudevents-witness",
        "enable.auto.commit": False,
    })
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    seen, deadline = 0, time.time() + 60
    while seen < count and time.time() < deadline:
        msg = consumer.poll(0.5)
        if msg is None or msg.error():
            continue
        headers = {k: v for k, v in (msg.headers() or [])}
        message = binding.KafkaMessage(headers=headers, key=msg.key(), value=msg.value())
        mode = "binary" if any(k.startswith("ce_") for k in headers) else "structured"
        event = binding.from_kafka(message, JSONFormat())
        print(json.dumps(describe(event, mode)), flush=True)
        seen += 1
    consumer.close()


def amqp(url, queue, count):
    import pika
    from cloudevents.core.bindings import amqp as amqp_binding
    from cloudevents.core.bindings import rabbitmq as rabbit_binding

    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    seen, deadline = 0, time.time() + 60
    while seen < count and time.time() < deadline:
        method, props, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            time.sleep(0.05)
            continue
        headers = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in (props.headers or {}).items()}
        structured = (props.content_type or "").startswith("application/cloudevents")
        if structured:
            message = rabbit_binding.RabbitMQMessage(headers=headers, content_type=props.content_type, body=body)
            event = rabbit_binding.from_rabbitmq(message, JSONFormat())
            mode = "structured"
        elif any(k.startswith("ce-") for k in headers):
            # The RabbitMQ binding: `ce-` headers.
            message = rabbit_binding.RabbitMQMessage(headers=headers, content_type=props.content_type, body=body)
            event = rabbit_binding.from_binary(message, JSONFormat())
            mode = "binary ce-"
        else:
            # The AMQP binding: `cloudEvents_` / `cloudEvents:` properties.
            message = amqp_binding.AMQPMessage(
                properties={"content-type": props.content_type},
                application_properties=headers,
                application_data=body,
            )
            event = amqp_binding.from_binary(message, JSONFormat())
            mode = "binary amqp"
        print(json.dumps(describe(event, mode)), flush=True)
        seen += 1
    conn.close()


if __name__ == "__main__":
    kind, where, what, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    {"kafka": kafka, "amqp": amqp}[kind](where, what, count)
