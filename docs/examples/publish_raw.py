"""Publish one heimdall.iq/v1 payload as a raw AMQP message and wait for its fix in Redis.

What a producer that is not Python (or does not use Celery) does, step by step, with nothing but an
AMQP client (pika) and a Redis client: no import of heimdall_inference, no Celery. The same message
from Node (amqplib) or Go (amqp091-go) has the same exchange, routing key, properties, headers and body.

    python docs/examples/publish_raw.py scene-0000.json \
        --amqp amqp://user:pass@rabbitmq:5672/%2F --redis redis://redis:6379/0 --key-prefix heimdall:

Prints the heimdall.fix/v1 document (exit 0), or the typed error (exit 2), or gives up (exit 3).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid

import pika
import redis


def publish(amqp_url: str, payload: dict, task_id: str) -> None:
    """One Celery protocol-2 message for task heimdall.predict, with publisher confirms."""
    body = json.dumps([
        [payload],  # positional arguments: the payload
        {},  # keyword arguments: none
        {"callbacks": None, "errbacks": None, "chain": None, "chord": None},  # no workflow
    ]).encode()
    properties = pika.BasicProperties(
        content_type="application/json",  # or application/x-msgpack (with raw bytes for the IQ)
        content_encoding="utf-8",  # "binary" for msgpack
        correlation_id=task_id,  # Celery reads the task id from here too
        delivery_mode=2,  # persistent
        headers={
            "lang": "py",  # the protocol-2 dialect, whatever the producer's language
            "task": "heimdall.predict",
            "id": task_id,
            "argsrepr": "(<heimdall.iq/v1>,)",  # what logs and Flower show instead of the IQ
            "kwargsrepr": "{}",
            # optional: seconds since the epoch, as a number or a string (pika has no float header type);
            # the fix then reports its time in the queue
            "heimdall_sent_at": f"{time.time():.6f}",
        },
    )
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = conn.channel()
        channel.confirm_delivery()  # basic_publish raises unless RabbitMQ has the message
        # exchange "heimdall" (topic) routes "heimdall.predict.#" to the quorum queue heimdall.predict;
        # mandatory: an unroutable message (wrong vhost, no worker ever declared the queue) is an error
        channel.basic_publish(exchange="heimdall", routing_key="heimdall.predict.task", body=body,
                              properties=properties, mandatory=True)
    finally:
        conn.close()


def wait_for_result(redis_url: str, key_prefix: str, task_id: str, timeout_s: float) -> dict:
    """The result document Celery stores under ``<key prefix>celery-task-meta-<task id>``.

    The worker's HEIMDALL_REDIS_KEY_PREFIX (default "heimdall:") comes first: with the default the
    key is ``heimdall:celery-task-meta-<id>``. Polling is the simplest; the worker also PUBLISHes the
    same document on a channel of the same name.
    """
    client = redis.Redis.from_url(redis_url)
    key = f"{key_prefix}celery-task-meta-{task_id}"
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            raw = client.get(key)
            if raw is not None:
                meta = json.loads(raw)
                if meta["status"] in ("SUCCESS", "FAILURE"):  # RETRY: the database was down; keep waiting
                    return meta
            time.sleep(0.05)
    finally:
        client.close()
    raise TimeoutError(f"no result under {key} after {timeout_s} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("payload", help="a heimdall.iq/v1 JSON file")
    ap.add_argument("--amqp", required=True, help="the broker URL (user, password and vhost included)")
    ap.add_argument("--redis", required=True, help="the result backend URL (HEIMDALL_RESULT_BACKEND)")
    ap.add_argument("--key-prefix", default="heimdall:", help="the workers' HEIMDALL_REDIS_KEY_PREFIX")
    ap.add_argument("--timeout-s", type=float, default=30.0)
    args = ap.parse_args(argv)
    with open(args.payload, encoding="utf-8") as f:
        payload = json.load(f)
    task_id = str(uuid.uuid4())
    publish(args.amqp, payload, task_id)
    try:
        meta = wait_for_result(args.redis, args.key_prefix, task_id, args.timeout_s)
    except TimeoutError as exc:
        print(json.dumps({"task_id": task_id, "error": str(exc)}))
        return 3
    if meta["status"] == "SUCCESS":
        print(json.dumps(meta["result"]))  # the heimdall.fix/v1 document
        return 0
    # a failure: {"exc_type": "PayloadError", "exc_module": "heimdall_inference.errors",
    #             "exc_message": [code, message, field]} for invalid input
    error = meta["result"]
    code, message, field = (list(error.get("exc_message") or []) + [None, None, None])[:3]
    print(json.dumps({"task_id": task_id, "error": {"type": error.get("exc_type"), "code": code,
                                                    "message": message, "field": field}}))
    return 2


if __name__ == "__main__":
    sys.exit(main())
