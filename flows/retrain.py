"""The `retrain` flow: snapshot → conditions → training on `gpu` → evaluation → gate → release.

Orchestration only: every step calls into `ingest`, `workers` or `policies`. Triggered by the
`proxyloop.dataset.updated` event (see flows.serve); run by hand with
`proxyloop retrain` or `prefect deployment run retrain/retrain`.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from celery.result import AsyncResult
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from safetensors.torch import load_file
from sqlalchemy.orm import Session

from ingest.bus import make_producer, publish
from ingest.conditions import run_condition_tests
from ingest.schemas import (
    CheckpointEvaluation,
    ConditionReport,
    GateDecision,
    PolicyReleased,
    TrainingRequest,
    TrainingResult,
)
from ingest.store import freeze_snapshot, load_snapshot_triples, make_engine, record_run
from policies.gate import GateRules, decide
from policies.registry import register
from proxyloop.settings import Settings, get_settings
from workers.app import CPU_QUEUE, EVALUATE_TASK, GPU_QUEUE, TRAIN_TASK
from workers.app import app as celery_app

TASK_TIMEOUT_S = 1800


class TrainingFailed(RuntimeError):
    pass


@task(name="freeze-snapshot")
def freeze(settings: Settings) -> dict[str, Any]:
    with Session(make_engine(settings.resolved_store_url)) as session:
        snapshot = freeze_snapshot(session)
        session.commit()
        frozen = {"snapshot_id": snapshot.snapshot_id, "n_expert": snapshot.n_expert, "n_proxy": snapshot.n_proxy}
    get_run_logger().info("snapshot %s: %d expert, %d proxy", frozen["snapshot_id"], frozen["n_expert"],
                          frozen["n_proxy"])
    return frozen


@task(name="check-conditions")
def check_conditions(settings: Settings, snapshot_id: str) -> ConditionReport:
    with Session(make_engine(settings.resolved_store_url)) as session:
        triples = load_snapshot_triples(session, snapshot_id)
    report = run_condition_tests(triples["expert"], triples["proxy"], snapshot_id, seed=settings.training_seed)
    rows = "\n".join(f"| {c.name} | {'pass' if c.passed else 'FAIL'} | {c.statistic:.4g} | {c.threshold:.4g} | "
                     f"{c.detail} |" for c in report.checks)
    create_markdown_artifact(
        key="condition-report",
        markdown=f"# Conditions for snapshot {snapshot_id}\n\n**plan: {report.plan}**\n\n"
        + "\n".join(f"- {r}" for r in report.reasons)
        + "\n\n| check | result | statistic | threshold | detail |\n|---|---|---|---|---|\n" + rows,
    )
    get_run_logger().info("snapshot %s: plan %s (%s)", snapshot_id, report.plan, "; ".join(report.reasons))
    return report


def wait_for_task(task_id: str, timeout_s: float = TASK_TIMEOUT_S) -> dict[str, Any]:
    """Poll a Celery task, logging its progress; a failed task raises with the worker's error."""
    logger = get_run_logger()
    result = AsyncResult(task_id, app=celery_app)
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        state = result.state
        if state == "SUCCESS":
            value: dict[str, Any] = result.get(timeout=10)
            return value
        if state in ("FAILURE", "REVOKED"):
            raise TrainingFailed(f"task {task_id} {state.lower()} on the worker: {result.result!r}\n{result.traceback}")
        if state == "PROGRESS" and result.info != last:
            last = result.info
            logger.info("task %s: %s", task_id, last)
        time.sleep(0.5)
    raise TrainingFailed(f"task {task_id} did not finish within {timeout_s:.0f} s (state {result.state})")


@task(name="train-on-gpu-queue")
def dispatch_training(request: TrainingRequest) -> TrainingResult:
    celery_app.send_task(TRAIN_TASK, args=[request.model_dump(mode="json")], queue=GPU_QUEUE, task_id=request.run_id)
    get_run_logger().info("run %s: training task sent to queue %s", request.run_id, GPU_QUEUE)
    return TrainingResult.model_validate(wait_for_task(request.run_id))


@task(name="evaluate-checkpoints")
def evaluate(settings: Settings, snapshot_id: str, training: TrainingResult) -> dict[str, Any]:
    sent = celery_app.send_task(
        EVALUATE_TASK, queue=CPU_QUEUE,
        args=[settings.resolved_store_url, snapshot_id, [c.model_dump() for c in training.checkpoints],
              settings.training_seed],
    )
    return wait_for_task(sent.id)


@task(name="gate")
def gate(settings: Settings, evaluation: dict[str, Any]) -> GateDecision:
    evaluations = [CheckpointEvaluation.model_validate(e) for e in evaluation["evaluations"]]
    rules = GateRules(settings.gate_min_heldout_accuracy, settings.gate_max_accuracy_drop,
                      use_indicators=evaluation["language_model"])
    decision = decide(evaluations, evaluation["baseline_accuracy"], rules)
    rows = "\n".join(f"| {e.step} | {e.heldout_accuracy:.3f} | {e.topk_entropy:.4f} | {e.topk_mass:.4f} |"
                     for e in evaluations)
    create_markdown_artifact(
        key="gate-decision",
        markdown=f"# Gate: {decision.decision}\n\n" + "\n".join(f"- {r}" for r in decision.reasons)
        + "\n\n| step | held-out accuracy | top-k entropy (bits) | top-k mass |\n|---|---|---|---|\n" + rows,
    )
    get_run_logger().info("gate: %s (%s)", decision.decision, "; ".join(decision.reasons))
    return decision


@task(name="release")
def release(settings: Settings, decision: GateDecision, lineage: dict[str, Any]) -> dict[str, Any]:
    assert decision.checkpoint is not None
    checkpoint_dir = Path(decision.checkpoint.path)
    tensors = load_file(str(checkpoint_dir / "model.safetensors"))
    config = json.loads((checkpoint_dir / "config.json").read_text())
    version = register(settings.registry_dir, settings.policy_name, tensors, config, lineage, alias="production")
    producer = make_producer(settings)
    try:
        publish(producer, settings.topic_policy_released, PolicyReleased(
            event_id=f"released-{version.policy}-{version.version}", policy=version.policy,
            version=version.version, alias="production", uri=version.path,
        ))
    finally:
        producer.close()
    get_run_logger().info("released %s v%d as production", version.policy, version.version)
    return {"policy": version.policy, "version": version.version, "alias": "production", "path": version.path}


def _record(settings: Settings, run_id: str, status: str, summary: dict[str, Any]) -> None:
    with Session(make_engine(settings.resolved_store_url)) as session:
        record_run(session, run_id, status, summary)
        session.commit()


@flow(name="retrain")
def retrain(expert_total: int = 0, proxy_total: int = 0) -> dict[str, Any]:
    """Retrain the policy on a fresh snapshot and release it if the gate allows."""
    settings = get_settings()
    run_id = str(flow_run.get_id() or uuid.uuid4())
    timings: dict[str, float] = {}
    summary: dict[str, Any] = {"run_id": run_id, "trigger": {"expert_total": expert_total,
                                                              "proxy_total": proxy_total}}
    _record(settings, run_id, "running", summary)
    try:
        started = time.perf_counter()
        snapshot = freeze(settings)
        timings["snapshot"] = time.perf_counter() - started
        summary["snapshot"] = snapshot

        started = time.perf_counter()
        report = check_conditions(settings, snapshot["snapshot_id"])
        timings["conditions"] = time.perf_counter() - started
        summary["conditions"] = report.model_dump(mode="json")
        if report.plan == "refuse":
            summary["timings_s"] = timings
            _record(settings, run_id, "refused", summary)
            return summary

        started = time.perf_counter()
        request = TrainingRequest(
            run_id=run_id, snapshot_id=snapshot["snapshot_id"], store_url=settings.resolved_store_url,
            plan=report.plan, output_dir=str(settings.runs_dir / run_id), seed=settings.training_seed,
        )
        training = dispatch_training(request)
        timings["training"] = time.perf_counter() - started
        summary["training"] = {**training.model_dump(mode="json"), "task_id": run_id, "queue": GPU_QUEUE}

        started = time.perf_counter()
        evaluation = evaluate(settings, snapshot["snapshot_id"], training)
        decision = gate(settings, evaluation)
        timings["evaluate_and_gate"] = time.perf_counter() - started
        summary["evaluation"] = evaluation
        summary["gate"] = decision.model_dump(mode="json")
        if decision.decision == "block":
            summary["timings_s"] = timings
            _record(settings, run_id, "blocked", summary)
            return summary

        started = time.perf_counter()
        lineage = {"snapshot": snapshot, "conditions": summary["conditions"], "training_request":
                   request.model_dump(mode="json"), "training": summary["training"], "gate": summary["gate"],
                   "flow_run_id": run_id}
        summary["release"] = release(settings, decision, lineage)
        timings["release"] = time.perf_counter() - started
        summary["timings_s"] = timings
        _record(settings, run_id, "released", summary)
        return summary
    except Exception as exc:
        summary["error"] = f"{type(exc).__name__}: {exc}"
        summary["timings_s"] = timings
        _record(settings, run_id, "failed", summary)
        raise
