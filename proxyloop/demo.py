"""`proxyloop demo [--task features|chat]`: one full cycle on a generated task, through the real stack.

Proxy preferences go to Kafka; expert labels are submitted through Label Studio's API when the stack runs
it (PROXYLOOP_EMBEDDED_LABELSTUDIO) and reach the receiver by its webhook, else are posted to the receiver
in Label Studio's format, marked simulated so no Label Studio project's reconciliation retracts them (the
report's `labels_via` says which). The consumer stores them, the threshold
event triggers the Prefect `retrain` flow, a Celery worker trains on the `gpu` queue, the gate decides,
the registry releases, and the serving endpoint answers. `features` is paper 1's Appendix D task served
by the predict route; `chat` is a generated chat preference task (ingest.synthetic_chat) trained with DPO,
gated on paper 2's indicators and served by `/v1/chat/completions`.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import httpx
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_result,
    stop_after_delay,
    wait_fixed,
)

from ground.schemas import Evaluation, Item, ProxyPreference, ReleaseRecord
from ground.settings import Settings
from ingest.bus import make_producer, publish, read_topic
from ingest.labelstudio.annotate import WebhookRefused, annotate_tasks, post_webhook, post_webhook_payloads
from ingest.labelstudio.provision import LabelStudioSetupError
from ingest.store import LabelRow, RetrainRun, make_engine, run_record
from ingest.synthetic import appendix_d
from ingest.synthetic_chat import chat_preferences
from proxyloop import stack

Say = Callable[[str], None]
FINAL_STATES = {"released", "blocked", "refused", "failed"}
TaskName = Literal["features", "chat"]
DEFAULT_PROXY = {"features": 3000, "chat": 600}


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


def _count_matching(settings: Settings, topic: str, match: Callable[[bytes], bool], want: int,
                    timeout_s: float) -> int:
    """Records of `topic` matching `match`, read until `want` of them are seen or the timeout."""
    values = read_topic(settings, topic, stop_when=lambda v: sum(map(match, v)) >= want, idle_polls=None,
                        timeout_s=timeout_s)
    return sum(map(match, values))


def _last_result(state: RetryCallState) -> Any:
    """What a poll that ran out of time returns: its last answer."""
    assert state.outcome is not None
    return state.outcome.result()


def _wait_stored(settings: Settings, event_ids: list[str], timeout_s: float = 120) -> int:
    """How many of `event_ids` are stored, once all are or `timeout_s` passed."""
    poll = Retrying(retry=retry_if_result(lambda stored: stored < len(event_ids)), wait=wait_fixed(0.5),
                    stop=stop_after_delay(timeout_s), retry_error_callback=_last_result)
    stored: int = poll(_count_stored, settings, event_ids)
    return stored


def _dead_letter_matches(demo_id: str) -> Callable[[bytes], bool]:
    def match(value: bytes) -> bool:
        return demo_id.encode() in base64.b64decode(json.loads(value)["original_b64"])
    return match


def _run_ids(settings: Settings) -> set[str]:
    with Session(make_engine(settings.resolved_store_url)) as session:
        return set(session.scalars(select(RetrainRun.run_id)))


def _wait_for_run(settings: Settings, before: set[str], timeout_s: float, say: Say) -> RetrainRun:
    engine = make_engine(settings.resolved_store_url)
    said: list[str] = [""]

    def newest() -> RetrainRun | None:
        with Session(engine) as session:
            run = session.scalars(
                select(RetrainRun).where(RetrainRun.run_id.not_in(before)).order_by(RetrainRun.updated_at.desc())
            ).first()
            if run is not None:
                session.expunge(run)
                if run.status != said[-1]:
                    say(f"retrain flow run {run.run_id}: {run.status}")
                    said.append(run.status)
            return run

    def timed_out(retry_state: RetryCallState) -> RetrainRun:
        raise DemoFailed(f"no retrain run finished within {timeout_s:.0f} s; see {settings.home_dir}/logs")

    poll = Retrying(retry=retry_if_result(lambda run: run is None or run.status not in FINAL_STATES),
                    wait=wait_fixed(1), stop=stop_after_delay(timeout_s), retry_error_callback=timed_out)
    finished: RetrainRun | None = poll(newest)
    assert finished is not None  # the poll retries until there is one
    return finished


@dataclass
class DemoTask:
    """What one demo publishes (proxy items, Label Studio task data with the expert's pick) and how it is served."""

    proxy_name: str
    proxy_items: list[Item]
    expert_tasks: list[tuple[dict[str, Any], Literal["left", "right"]]]
    serve: Callable[[Settings, ReleaseRecord], dict[str, Any]]


def _auth(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.api_key_list[0]}"}


def feature_task(settings: Settings, n_proxy: int, n_expert: int) -> DemoTask:
    task = appendix_d(n_proxy=n_proxy, n_expert=n_expert, seed=settings.training_seed)
    expert_tasks: list[tuple[dict[str, Any], Literal["left", "right"]]] = []
    for triple in task.expert:
        y_a, y_b = sorted((triple.y_w, triple.y_l))
        data = {"prompt": f"x = {[round(v, 3) for v in triple.x]}", "x": triple.x, "y_a": y_a, "y_b": y_b,
                "answer_a": f"output {y_a}", "answer_b": f"output {y_b}"}
        expert_tasks.append((data, "left" if triple.y_w == y_a else "right"))

    def serve(settings: Settings, release: ReleaseRecord) -> dict[str, Any]:
        response = httpx.post(f"{settings.http_url}/v1/policies/{release.policy}@production/predict",
                              json={"x": task.expert_heldout[0].x}, headers=_auth(settings), timeout=30)
        body = response.json() if response.status_code == 200 else {}
        return {"status": response.status_code, **({"model": body.get("model"), "version": body.get("version"),
                                                    "probs": body.get("probs")} if body else {"error": response.text})}

    return DemoTask("tempered-judge", list(task.proxy), expert_tasks, serve)


def chat_task(settings: Settings, n_proxy: int, n_expert: int) -> DemoTask:
    task = chat_preferences(n_proxy=n_proxy, n_expert=n_expert, seed=settings.training_seed)
    expert_tasks: list[tuple[dict[str, Any], Literal["left", "right"]]] = [
        ({"prompt": p.prompt, "answer_a": p.response_a, "answer_b": p.response_b},
         "left" if p.choice == "a" else "right") for p in task.expert]

    def serve(settings: Settings, release: ReleaseRecord) -> dict[str, Any]:
        question = task.expert_heldout[0].prompt
        response = httpx.post(f"{settings.http_url}/v1/chat/completions", headers=_auth(settings), timeout=60,
                              json={"model": f"{release.policy}@production", "temperature": 0, "max_tokens": 32,
                                    "messages": [{"role": "user", "content": question}]})
        if response.status_code != 200:
            return {"status": response.status_code, "error": response.text}
        body = response.json()
        model = str(body["model"])
        return {"status": 200, "model": model, "version": int(model.rpartition("@")[2]), "prompt": question,
                "content": body["choices"][0]["message"]["content"],
                "finish_reason": body["choices"][0]["finish_reason"]}

    return DemoTask("synthetic-judge", list(task.proxy), expert_tasks, serve)


def run_demo(settings: Settings, say: Say, n_proxy: int | None = None, n_expert: int = 60, keep_up: bool = False,
             timeout_s: float = 300, task: TaskName = "features") -> dict[str, Any]:
    timings: dict[str, float] = {}
    started_here = not stack.is_up(settings)
    make_task = chat_task if task == "chat" else feature_task
    demo_task = make_task(settings, DEFAULT_PROXY[task] if n_proxy is None else n_proxy, n_expert)
    try:
        with _timed(timings, "stack_up"):
            if started_here:
                say("starting the local stack …")
                stack.up(settings, say)
        return {"task": task, **_drive(settings, say, demo_task, timings, timeout_s)}
    finally:
        if started_here and not keep_up:
            say("stopping the local stack (use --keep-up to leave it running)")
            stack.down(settings, say)


def _indicators(evaluation: Evaluation | None) -> list[dict[str, Any]]:
    """Per checkpoint: held-out accuracy and every indicator (language models: teacher-forced and generated)."""
    return [{"step": e.step, "heldout_accuracy": e.heldout_accuracy, "topk_entropy": e.topk_entropy,
             "topk_mass": e.topk_mass, **e.indicators} for e in (evaluation.evaluations if evaluation else [])]


_post_webhook = post_webhook  # tests/faults/ingest_cases.py imports it from here


def _post_payloads(settings: Settings, say: Say, task: DemoTask) -> list[str]:
    say(f"posting {len(task.expert_tasks)} expert labels to the webhook receiver as Label Studio would …")
    try:
        return post_webhook_payloads(settings, task.expert_tasks)
    except WebhookRefused as exc:
        raise DemoFailed(str(exc)) from exc


def _label_in_labelstudio(settings: Settings, say: Say, task: DemoTask,
                          timeout_s: float = 180) -> tuple[list[str], dict[str, Any]]:
    """The expert labels submitted through Label Studio's API; returned once its webhook has them all stored."""
    from label_studio_sdk.core.api_error import ApiError

    say(f"importing {len(task.expert_tasks)} tasks into Label Studio at {settings.labelstudio_url} and "
        "submitting the expert's labels through its API …")
    try:
        done = annotate_tasks(settings, task.expert_tasks)
    except (LabelStudioSetupError, ApiError) as exc:
        raise DemoFailed(f"Label Studio at {settings.labelstudio_url}: {exc}") from exc
    stored = _wait_stored(settings, done.event_ids, timeout_s)
    if stored < len(done.event_ids):
        raise DemoFailed(f"{stored} of {len(done.event_ids)} Label Studio annotations reached the store within "
                         f"{timeout_s:.0f} s: is its webhook delivering? See {settings.home_dir}/logs/labelstudio.log"
                         " and http.log; `proxyloop labelstudio reconcile` publishes what a webhook missed")
    say(f"{stored} annotations reached the store through Label Studio's webhook")
    return done.event_ids, {"url": settings.labelstudio_url, "project_id": done.project_id,
                            "task_ids": done.task_ids, "annotation_ids": done.annotation_ids}


def _drive(settings: Settings, say: Say, task: DemoTask, timings: dict[str, float],
           timeout_s: float) -> dict[str, Any]:
    demo_id = f"demo-{uuid.uuid4().hex[:8]}"
    before = _run_ids(settings)
    producer = make_producer(settings)
    proxy_ids = [f"{demo_id}-proxy-{i}" for i in range(len(task.proxy_items))]
    with _timed(timings, "publish_proxy"):
        say(f"publishing {len(task.proxy_items)} proxy preferences to {settings.topic_proxy} …")
        for event_id, item in zip(proxy_ids, task.proxy_items, strict=True):
            publish(producer, settings.topic_proxy, ProxyPreference(
                event_id=event_id, proxy_name=task.proxy_name, item=item), wait=False)
        for raw in _malformed(demo_id):
            producer.send(settings.topic_proxy, key=demo_id.encode(), value=raw)
        producer.flush()
    producer.close()

    # The proxy stream is ingested (and the malformed events dead-lettered) before annotators post:
    # the embedded broker has failed idempotent publishes from two producers writing at once.
    with _timed(timings, "ingest_proxy"):
        _wait_stored(settings, proxy_ids)
        dead = _count_matching(settings, settings.topic_dead_letter, _dead_letter_matches(demo_id), 3, 30)
        say(f"dead-lettered {dead} malformed events")

    labelstudio: dict[str, Any] | None = None
    with _timed(timings, "post_expert"):
        if settings.embedded_labelstudio and stack.component("labelstudio").healthy(settings):
            expert_ids, labelstudio = _label_in_labelstudio(settings, say, task)
        else:
            expert_ids = _post_payloads(settings, say, task)

    published = proxy_ids + expert_ids
    with _timed(timings, "ingest"):
        stored = _wait_stored(settings, published)
        say(f"stored {stored}/{len(published)} events")

    with _timed(timings, "retrain"):
        run = _wait_for_run(settings, before, timeout_s, say)
    record = run_record(run)
    if run.status == "failed":
        raise DemoFailed(f"retrain flow failed: {record.error}")

    serving: dict[str, Any] = {"status": None, "model": None}
    release, event_seen = record.release, None
    with _timed(timings, "serving"):
        if release is not None:
            version = release.version
            event_seen = _count_matching(settings, settings.topic_policy_released,
                                         lambda v: json.loads(v)["version"] == version, 1, 20) > 0
            serving = task.serve(settings, release)
            say(f"serving answered {serving['status']}: {json.dumps(serving)[:200]}")

    summary = record.model_dump(mode="json")
    training = summary["training"] or {}
    conditions = summary["conditions"] or {}
    gate = summary["gate"] or {}
    released = summary["release"] or {}
    return {
        "demo_id": demo_id,
        "labels_via": "webhook_payloads" if labelstudio is None else "labelstudio",
        "labelstudio": labelstudio,
        "events": {"proxy_published": len(proxy_ids), "expert_published": len(expert_ids),
                   "malformed_published": 3, "stored": stored, "dead_lettered": dead},
        "snapshot": summary["snapshot"],
        "conditions": {"plan": conditions.get("plan"), "reasons": conditions.get("reasons", []),
                       "checks": [{k: c[k] for k in ("name", "passed", "statistic", "threshold")}
                                  for c in conditions.get("checks", [])]},
        "training": {"task_id": training.get("task_id"), "queue": training.get("queue"),
                     "device": training.get("device"), "worker": training.get("worker"),
                     "final_loss": training.get("final_loss"), "checkpoints": len(training.get("checkpoints", [])),
                     "base_model": (summary["training_request"] or {}).get("base_model")},
        "stage1": {"task_id": (summary.get("stage1") or {}).get("task_id"),
                   "checkpoints": len((summary.get("stage1") or {}).get("checkpoints", [])),
                   "dataset": (summary.get("stage1_request") or {}).get("dataset")},
        "evaluation": summary["evaluation"],
        "indicators": _indicators(record.evaluation),
        "gate": {"decision": gate.get("decision"), "reasons": gate.get("reasons", []),
                 "checkpoint_step": (gate.get("checkpoint") or {}).get("step"),
                 "baseline_accuracy": gate.get("baseline_accuracy")},
        "release": {"policy": released.get("policy"), "version": released.get("version"),
                    "alias": released.get("alias"), "event_seen": event_seen},
        "serving": serving,
        "flow": {"run_id": run.run_id, "status": run.status, "timings_s": record.timings_s},
        "timings_s": timings,
    }
