"""The stage flows and `retrain`, which chains them: snapshot → conditions → training on `gpu`
→ evaluation → gate → release.

The snapshot's item kind picks the branch: feature triples train the two-stage feature policy;
pairwise text (chat) trains a language model with DPO (`proxyloop.train_lm`), evaluates each
checkpoint's held-out accuracy and paper 2's indicators on `cpu`, and releases a `causal_lm` policy.

Each stage is also its own deployment (see flows.deployments), so an operator can re-run one stage of
a run by its id, e.g. `proxyloop override RUN --reason ...` runs `release` on a blocked run.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from sqlalchemy.orm import Session

from flows.artifacts import publish_condition_report, publish_gate_decision, publish_release
from flows.tasks import (
    chat_base_model,
    chat_training_request,
    check_conditions,
    dispatch_lm_training,
    dispatch_training,
    evaluate,
    evaluate_lm,
    freeze,
    gate,
    record,
    text_conditions,
    write_chat_data,
)
from ground.schemas import CheckpointEvaluation, GateDecision, TrainingRequest, TrainingResult, utcnow
from ground.settings import get_settings
from ingest.store import RetrainRun, make_engine
from policies.audit import ReleaseEvidence, current_user
from policies.lm.release import release_causal_lm
from policies.release import release_checkpoint
from workers.app import GPU_QUEUE


class RunNotFound(LookupError):
    pass


def load_run(run_id: str) -> RetrainRun:
    with Session(make_engine(get_settings().resolved_store_url)) as session:
        run = session.get(RetrainRun, run_id)
        if run is None:
            raise RunNotFound(f"no retrain run {run_id!r}; `proxyloop runs` lists them")
        session.expunge(run)
        return run


def _is_chat(snapshot: dict[str, Any]) -> bool:
    return bool(snapshot.get("item_kind") == "pairwise_text")


def _train_chat_policy(run_id: str, summary: dict[str, Any]) -> TrainingResult:
    """Snapshot pairs → JSONL → DPO of the chat base model on the `gpu` queue; records data and request."""
    settings = get_settings()
    summary["chat_data"] = write_chat_data(settings, run_id, summary["snapshot"]["snapshot_id"])
    base_model = chat_base_model(settings)
    request = chat_training_request(settings, run_id, base_model, summary["chat_data"]["train"])
    summary["training_request"] = request.model_dump(mode="json")
    record(settings, run_id, "training", summary)
    return dispatch_lm_training(request)


@flow(name="check-conditions")
def check_conditions_flow(run_id: str | None = None) -> dict[str, Any]:
    """Freeze a snapshot and run the sufficient-condition tests on it."""
    settings = get_settings()
    run_id = run_id or str(flow_run.get_id() or uuid.uuid4())
    snapshot = freeze(settings)
    if _is_chat(snapshot):
        report = text_conditions(settings, snapshot["snapshot_id"])
    else:
        report = check_conditions(settings, snapshot["snapshot_id"])
    publish_condition_report(settings, run_id, report)
    return {"snapshot": snapshot, "conditions": report.model_dump(mode="json")}


@flow(name="evaluate-and-gate")
def evaluate_and_gate_flow(run_id: str) -> dict[str, Any]:
    """Evaluate a run's checkpoints on held-out expert data and apply the release gate."""
    settings = get_settings()
    summary = load_run(run_id).summary
    training = TrainingResult.model_validate(summary["training"])
    if _is_chat(summary["snapshot"]):
        evaluation = evaluate_lm(summary["training_request"]["base_model"], summary["chat_data"]["heldout"], training)
    else:
        evaluation = evaluate(settings, summary["snapshot"]["snapshot_id"], training)
    decision = gate(settings, evaluation)
    evals = [CheckpointEvaluation.model_validate(e) for e in evaluation["evaluations"]]
    publish_gate_decision(settings, run_id, decision, evals)
    return {"evaluation": evaluation, "gate": decision.model_dump(mode="json")}


@flow(name="release")
def release_flow(run_id: str, override_reason: str | None = None, operator: str | None = None) -> dict[str, Any]:
    """Release a run's gated checkpoint; a blocked run needs `override_reason` (audited in lineage and in the
    promotion history, with `operator`, default the OS user)."""
    settings = get_settings()
    run = load_run(run_id)
    summary = dict(run.summary)
    decision = GateDecision.model_validate(summary["gate"])
    if decision.checkpoint is None:
        raise ValueError(f"run {run_id} has no evaluated checkpoint to release")
    who = operator or current_user()
    override = None
    if decision.decision == "block":
        if not override_reason:
            raise PermissionError(f"run {run_id} was blocked by the gate: {decision.reasons}; "
                                  "release it only with an override reason")
        override = {"by": who, "reason": override_reason, "at": utcnow().isoformat(),
                    "gate_reasons": decision.reasons}
        get_run_logger().warning("run %s: gate overridden by %s: %s", run_id, who, override_reason)
    lineage = {"snapshot": summary["snapshot"], "conditions": summary["conditions"],
               "training_request": summary.get("training_request"), "training": summary["training"],
               "gate": summary["gate"], "override": override, "flow_run_id": run_id}
    evidence = ReleaseEvidence(who=who, why=override_reason or f"gate decision {decision.decision!r} for run {run_id}",
                               gate=summary["gate"], snapshot_id=summary["snapshot"]["snapshot_id"],
                               override=override is not None)
    if _is_chat(summary["snapshot"]):
        lineage["chat_data"] = summary["chat_data"]  # the JSONL files and the snapshot they came from
        version = release_causal_lm(settings, Path(decision.checkpoint.path), lineage, evidence=evidence)
    else:
        version = release_checkpoint(settings, Path(decision.checkpoint.path), lineage, evidence=evidence)
    release = {"policy": version.policy, "version": version.version, "alias": "production", "path": version.path,
               "override": override, "family": "causal_lm" if _is_chat(summary["snapshot"]) else "feature"}
    publish_release(settings, release)
    summary["release"] = release
    record(settings, run_id, "released", summary)
    get_run_logger().info("run %s: released %s v%d as production", run_id, version.policy, version.version)
    return release


@flow(name="retrain")
def retrain(expert_total: int = 0, proxy_total: int = 0) -> dict[str, Any]:
    """Retrain the policy on a fresh snapshot and release it if the gate allows."""
    settings = get_settings()
    run_id = str(flow_run.get_id() or uuid.uuid4())
    timings: dict[str, float] = {}
    summary: dict[str, Any] = {"run_id": run_id, "trigger": {"expert_total": expert_total,
                                                              "proxy_total": proxy_total}}
    record(settings, run_id, "running", summary)

    def stage(name: str, started: float) -> None:
        timings[name] = round(time.perf_counter() - started, 3)
        summary["timings_s"] = timings

    try:
        started = time.perf_counter()
        summary.update(check_conditions_flow.fn(run_id))  # .fn: artifacts land on this run
        stage("conditions", started)
        plan = summary["conditions"]["plan"]
        if plan == "refuse":
            record(settings, run_id, "refused", summary)
            return summary

        started = time.perf_counter()
        if _is_chat(summary["snapshot"]):
            training = _train_chat_policy(run_id, summary)
        else:
            request = TrainingRequest(
                run_id=run_id, snapshot_id=summary["snapshot"]["snapshot_id"], store_url=settings.resolved_store_url,
                plan=plan, output_dir=str(settings.runs_dir / run_id), seed=settings.training_seed,
            )
            summary["training_request"] = request.model_dump(mode="json")
            training = dispatch_training(request)
        summary["training"] = {**training.model_dump(mode="json"), "task_id": run_id, "queue": GPU_QUEUE}
        stage("training", started)
        record(settings, run_id, "trained", summary)

        started = time.perf_counter()
        summary.update(evaluate_and_gate_flow.fn(run_id))
        stage("evaluate_and_gate", started)
        if summary["gate"]["decision"] == "block":
            record(settings, run_id, "blocked", summary)
            return summary
        record(settings, run_id, "gated", summary)

        started = time.perf_counter()
        summary["release"] = release_flow.fn(run_id)
        stage("release", started)
        record(settings, run_id, "released", summary)
        return summary
    except Exception as exc:
        summary["error"] = f"{type(exc).__name__}: {exc}"
        record(settings, run_id, "failed", summary)
        raise
