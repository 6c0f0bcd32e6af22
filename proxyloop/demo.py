"""`proxyloop demo`: one full cycle on a generated paper-1 task, through the real stack.

Proxy preferences go to Kafka, expert labels go to the webhook receiver in Label Studio's
format, the consumer stores them, the threshold event triggers the Prefect `retrain` flow, a
Celery worker trains on the `gpu` queue, the gate decides, the registry releases, and the
serving endpoint answers.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from kafka import KafkaConsumer, TopicPartition
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ingest.bus import make_producer, publish
from ingest.labelstudio import SECRET_HEADER, webhook_payload
from ingest.schemas import ProxyPreference
from ingest.store import LabelRow, RetrainRun, make_engine
from ingest.synthetic import appendix_d
from proxyloop import stack
from proxyloop.settings import Settings

Say = Callable[[str], None]
FINAL_STATES = {"released", "blocked", "refused", "failed"}


class DemoFailed(RuntimeError):
    pass


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    timings[stage] = round(time.perf_counter() - started, 2)


def _malformed(demo_id: str) -> list[bytes]:
    """Three kinds of bad input a proxy producer might send; each must be dead-lettered."""
    return [
        f"not json {demo_id}".encode(),
        json.dumps({"schema_version": 1, "event_id": f"{demo_id}-bad-schema", "kind": "proxy_preference"}).encode(),
        json.dumps({"schema_version": 1, "event_id": f"{demo_id}-bad-triple", "kind": "proxy_preference",
                    "proxy_name": "judge", "item": {"type": "features", "x": [0.0], "y_w": 1, "y_l": 1}}).encode(),
    ]


def _count_stored(settings: Settings, event_ids: list[str]) -> int:
    with Session(make_engine(settings.resolved_store_url)) as session:
        return sum(
            session.scalar(select(func.count()).where(LabelRow.event_id.in_(event_ids[i : i + 500]))) or 0
            for i in range(0, len(event_ids), 500)
        )


def _read_topic(settings: Settings, topic: str, match: Callable[[bytes], bool], want: int, timeout_s: float) -> int:
    """Count records of a topic matching `match`, reading all partitions from the start."""
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in range(settings.topic_partitions)]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        seen, deadline = 0, time.monotonic() + timeout_s
        while seen < want and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                seen += sum(match(r.value) for r in records)
        return seen
    finally:
        consumer.close()


def _dead_letter_matches(demo_id: str) -> Callable[[bytes], bool]:
    def match(value: bytes) -> bool:
        return demo_id.encode() in base64.b64decode(json.loads(value)["original_b64"])
    return match


def _run_ids(settings: Settings) -> set[str]:
    with Session(make_engine(settings.resolved_store_url)) as session:
        return set(session.scalars(select(RetrainRun.run_id)))


def _wait_for_run(settings: Settings, before: set[str], timeout_s: float, say: Say) -> RetrainRun:
    engine = make_engine(settings.resolved_store_url)
    deadline, last_status = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        with Session(engine) as session:
            run = session.scalars(
                select(RetrainRun).where(RetrainRun.run_id.not_in(before)).order_by(RetrainRun.updated_at.desc())
            ).first()
            if run is not None:
                if run.status != last_status:
                    say(f"retrain flow run {run.run_id}: {run.status}")
                    last_status = run.status
                if run.status in FINAL_STATES:
                    session.expunge(run)
                    return run
        time.sleep(1)
    raise DemoFailed(f"no retrain run finished within {timeout_s:.0f} s; see {settings.home_dir}/logs")


def run_demo(settings: Settings, say: Say, n_proxy: int = 3000, n_expert: int = 60, keep_up: bool = False,
             timeout_s: float = 300) -> dict[str, Any]:
    timings: dict[str, float] = {}
    started_here = not stack.is_up(settings)
    try:
        with _timed(timings, "stack_up"):
            if started_here:
                say("starting the local stack …")
                stack.up(settings, say)
        return _drive(settings, say, n_proxy, n_expert, timings, timeout_s)
    finally:
        if started_here and not keep_up:
            say("stopping the local stack (use --keep-up to leave it running)")
            stack.down(settings, say)


def _drive(settings: Settings, say: Say, n_proxy: int, n_expert: int, timings: dict[str, float],
           timeout_s: float) -> dict[str, Any]:
    demo_id = f"demo-{uuid.uuid4().hex[:8]}"
    task = appendix_d(n_proxy=n_proxy, n_expert=n_expert, seed=settings.training_seed)
    before = _run_ids(settings)
    producer = make_producer(settings)
    proxy_ids = [f"{demo_id}-proxy-{i}" for i in range(len(task.proxy))]
    with _timed(timings, "publish_proxy"):
        say(f"publishing {len(task.proxy)} proxy preferences to {settings.topic_proxy} …")
        for event_id, triple in zip(proxy_ids, task.proxy, strict=True):
            publish(producer, settings.topic_proxy, ProxyPreference(
                event_id=event_id, proxy_name="tempered-judge", item=triple), wait=False)
        for raw in _malformed(demo_id):
            producer.send(settings.topic_proxy, key=demo_id.encode(), value=raw)
        producer.flush()
    producer.close()

    expert_ids: list[str] = []
    annotation_base = uuid.uuid4().int % 10**9
    with _timed(timings, "post_expert"), httpx.Client(base_url=settings.http_url, timeout=30) as client:
        say(f"posting {len(task.expert)} expert labels to the webhook receiver as Label Studio would …")
        for i, triple in enumerate(task.expert):
            y_a, y_b = sorted((triple.y_w, triple.y_l))
            data = {"prompt": f"x = {[round(v, 3) for v in triple.x]}", "x": triple.x, "y_a": y_a, "y_b": y_b,
                    "answer_a": f"output {y_a}", "answer_b": f"output {y_b}"}
            payload = webhook_payload(task_id=annotation_base + i, annotation_id=annotation_base + i, data=data,
                                      selected="left" if triple.y_w == y_a else "right", annotator=7)
            response = client.post("/webhooks/labelstudio", json=payload,
                                   headers={SECRET_HEADER: settings.webhook_secret})
            if response.status_code != 200:
                raise DemoFailed(f"webhook answered {response.status_code}: {response.text}")
            expert_ids.append(response.json()["event_id"])

    published = proxy_ids + expert_ids
    with _timed(timings, "ingest"):
        deadline, stored = time.monotonic() + 120, 0
        while time.monotonic() < deadline and stored < len(published):
            stored = _count_stored(settings, published)
            time.sleep(0.5)
        say(f"stored {stored}/{len(published)} events")
        dead = _read_topic(settings, settings.topic_dead_letter, _dead_letter_matches(demo_id), 3, 30)
        say(f"dead-lettered {dead} malformed events")

    with _timed(timings, "retrain"):
        run = _wait_for_run(settings, before, timeout_s, say)
    summary: dict[str, Any] = run.summary
    if run.status == "failed":
        raise DemoFailed(f"retrain flow failed: {summary.get('error')}")

    serving: dict[str, Any] = {"status": None, "model": None}
    release = summary.get("release") or {}
    with _timed(timings, "serving"):
        if release:
            released_seen = _read_topic(settings, settings.topic_policy_released,
                                        lambda v: json.loads(v)["version"] == release["version"], 1, 20)
            release["event_seen"] = released_seen > 0
            response = httpx.post(
                f"{settings.http_url}/v1/policies/{release['policy']}@production/predict",
                json={"x": task.expert_heldout[0].x},
                headers={"Authorization": f"Bearer {settings.api_key_list[0]}"}, timeout=30,
            )
            serving = {"status": response.status_code, **({"model": response.json().get("model"),
                       "version": response.json().get("version"), "probs": response.json().get("probs")}
                       if response.status_code == 200 else {"error": response.text})}
            say(f"serving answered {response.status_code}: {response.text[:200]}")

    training = summary.get("training", {})
    conditions = summary.get("conditions", {})
    gate = summary.get("gate", {})
    return {
        "demo_id": demo_id,
        "events": {"proxy_published": len(proxy_ids), "expert_published": len(expert_ids),
                   "malformed_published": 3, "stored": stored, "dead_lettered": dead},
        "snapshot": summary.get("snapshot"),
        "conditions": {"plan": conditions.get("plan"), "reasons": conditions.get("reasons", []),
                       "checks": [{k: c[k] for k in ("name", "passed", "statistic", "threshold")}
                                  for c in conditions.get("checks", [])]},
        "training": {"task_id": training.get("task_id"), "queue": training.get("queue"),
                     "device": training.get("device"), "worker": training.get("worker"),
                     "final_loss": training.get("final_loss"), "checkpoints": len(training.get("checkpoints", []))},
        "evaluation": summary.get("evaluation"),
        "gate": {"decision": gate.get("decision"), "reasons": gate.get("reasons", [])},
        "release": {"policy": release.get("policy"), "version": release.get("version"),
                    "alias": release.get("alias"), "event_seen": release.get("event_seen")},
        "serving": serving,
        "flow": {"run_id": run.run_id, "status": run.status, "timings_s": summary.get("timings_s", {})},
        "timings_s": timings,
    }
