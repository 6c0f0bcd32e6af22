"""Ingest throughput: the full path (decode + validate + idempotent upsert + store commit + offset
commit) against a bare kafka-python consume loop, on the same broker and the same records.

Run: `.venv/bin/python bench/ingest.py [--quick] [--events N] [--store-url URL]`
Starts its own Tansu broker on a free loopback port; last line is JSON with `ratio`, `pipeline_eps`, `bare_eps`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

# This file shares its name with the `ingest` package: run as a script, its own folder would shadow it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from kafka import KafkaConsumer  # noqa: E402

from ground.schemas import FeatureTriple, PairwiseText, ProxyPreference  # noqa: E402
from ground.settings import Settings  # noqa: E402
from ingest.bus import ensure_topics, make_consumer, make_producer, publish  # noqa: E402
from ingest.consumer import store_batch  # noqa: E402
from ingest.store import make_engine  # noqa: E402
from proxyloop import stack, testing  # noqa: E402


def _event(i: int) -> ProxyPreference:
    if i % 2:
        return ProxyPreference(event_id=f"bench-{i}", proxy_name="judge",
                               item=FeatureTriple(x=[0.1 * (i % 7)] * 5, y_w=i % 3, y_l=(i + 1) % 3))
    return ProxyPreference(event_id=f"bench-{i}", proxy_name="judge",
                           item=PairwiseText(prompt=f"prompt {i} " * 20, response_a="a " * 100,
                                             response_b="b " * 100, choice="a"))


def produce(settings: Settings, n: int) -> float:
    producer = make_producer(settings)
    start = time.perf_counter()
    futures = [publish(producer, settings.topic_proxy, _event(i), wait=False) for i in range(n)]
    producer.flush()
    for future in futures:
        future.get(timeout=60)
    producer.close()
    return n / (time.perf_counter() - start)


def _consume(consumer: KafkaConsumer, n: int, handle: object) -> float:
    """Events/s from the first record polled to the n-th handled (the group join is not timed)."""
    seen, start = 0, None
    while seen < n:
        polled = consumer.poll(timeout_ms=500)
        records = [r for batch in polled.values() for r in batch]
        if not records:
            continue
        start = start or time.perf_counter()
        handle(records)  # type: ignore[operator]
        seen += len(records)
    assert start is not None
    return n / (time.perf_counter() - start)


def bare(settings: Settings, n: int) -> float:
    consumer = make_consumer(settings, [settings.topic_proxy], "bench-bare")
    try:
        return _consume(consumer, n, lambda records: None)
    finally:
        consumer.close()


def pipeline(settings: Settings, n: int) -> float:
    engine = make_engine(settings.resolved_store_url)
    producer = make_producer(settings)
    consumer = make_consumer(settings, [settings.topic_proxy], "bench-pipeline")

    def handle(records: list[object]) -> None:
        outcome = store_batch(engine, producer, settings, records)
        assert outcome.dead_lettered == 0
        consumer.commit()  # after the store commit, as ingest.consumer does

    try:
        return _consume(consumer, n, handle)
    finally:
        consumer.close()
        producer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 000 events instead of 30 000")
    parser.add_argument("--events", type=int, default=None)
    parser.add_argument("--store-url", default="", help="default: a fresh SQLite file")
    parser.add_argument("--broker-storage", choices=["s3", "memory"], default="s3",
                        help="the embedded broker's log: in the SeaweedFS object store (default, durable) or memory")
    args = parser.parse_args()
    n = args.events or (3_000 if args.quick else 30_000)
    home = Path(tempfile.mkdtemp(prefix="proxyloop-bench-"))
    settings = testing.isolated_settings(home, store_url=args.store_url or f"sqlite:///{home}/store.db",
                                       broker_storage=args.broker_storage)
    started = [c for c in map(stack.component, ("objectstore", "kafka")) if c.enabled(settings)]
    for component in started:
        stack.start_component(settings, component, lambda _: None)
    try:
        ensure_topics(settings)
        produce_eps = produce(settings, n)
        print(f"produced {n} events ({produce_eps:,.0f}/s, kafka-python, acks=all)")
        bare_eps = bare(settings, n)
        print(f"bare kafka-python consume loop: {bare_eps:,.0f} events/s")
        pipeline_eps = pipeline(settings, n)
        print(f"full ingest path (decode+validate+upsert+store commit+offset commit): {pipeline_eps:,.0f} events/s")
        ratio = pipeline_eps / bare_eps
        print(f"ratio pipeline/bare: {ratio:.3f}")
        print(json.dumps({"events": n, "ratio": round(ratio, 4), "pipeline_eps": round(pipeline_eps, 1),
                          "bare_eps": round(bare_eps, 1), "produce_eps": round(produce_eps, 1),
                          "store": settings.resolved_store_url.split(":")[0],
                          "broker": f"tansu 0.6.0 {args.broker_storage}"}))
    finally:
        for component in reversed(started):
            stack.stop_component(settings, component.name)


if __name__ == "__main__":
    main()
