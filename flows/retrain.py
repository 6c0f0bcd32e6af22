"""The retrain flow, the stage flows it chains, and the Prefect tasks of each stage: snapshot →
conditions → training on `gpu` → evaluation → gate → release.

The snapshot's item kind picks the branch: feature triples train the two-stage feature policy;
pairwise text (chat) first trains stage 1 (DPO on the proxy pairs, in the reading `PROXYLOOP_CHAT_READING`
selects: a mode mixture over the frozen base by default, or a D-simplex bottleneck), runs paper 1's condition
tests on it, then trains what the plan says (workers.lm.plans), evaluates each checkpoint's held-out accuracy
and paper 2's indicators on `cpu`, and releases a `causal_lm` policy.
The chat family's own tasks are in flows/chat.py; sending and waiting on Celery in flows/celery_tasks.py.

Each stage is also its own deployment (see flows.deployments), so an operator can re-run one stage of
a run by its id, e.g. `proxyloop override RUN --reason ...` runs `release` on a blocked run.

Transient failures (broker or database hiccups) are retried with backoff; a training task that failed
on the worker is not: it fails the flow run with the worker's error. What needs torch (the feature
family's condition tests, the causal-LM release) is imported where it is used, so that a flow run's
subprocess starts without torch (tests/flows/test_import_cost.py; docs/benchmarks.md, trigger latency).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run
from sqlalchemy.orm import Session

from flows.artifacts import publish_condition_report, publish_gate_decision, publish_release
from flows.celery_tasks import RETRY_DELAYS_S, run_on_queue, train_on_gpu_queue, transient
from flows.chat import (
    chat_base_model,
    chat_recipe,
    dispatch_lm_training,
    evaluate_lm,
    text_conditions,
    write_chat_data,
)
from ground.moments import utcnow
from ground.schemas import (
    ConditionReport,
    Evaluation,
    EvaluationRequest,
    GateDecision,
    LMTrainingRequest,
    ReleaseRecord,
    RetrainRunRecord,
    SnapshotInfo,
    TrainingRecord,
    TrainingRequest,
    TrainingResult,
)
from ground.settings import Settings, get_settings
from ingest.store import RetrainRun, freeze_snapshot, load_snapshot_triples, make_engine, record_run, run_record
from ingest.text_snapshot import snapshot_item_kind
from policies.audit_log import ReleaseEvidence, current_user
from policies.lm.gate import decide_language_model
from policies.promotion import decide, finish_release_of_run, gate_rules, release_checkpoint, too_little_heldout
from policies.registry_lock import release_lock
from workers.app import CPU_QUEUE, EVALUATE_TASK, GPU_QUEUE, TRAIN_TASK
from workers.lm.plans import plan_request, recipe_request
from workers.lm.snapshot_data import NoTextPairs


@task(name="freeze-snapshot", retries=3, retry_delay_seconds=RETRY_DELAYS_S)
def freeze(settings: Settings) -> SnapshotInfo:
    with Session(make_engine(settings.resolved_store_url)) as session:
        snapshot = freeze_snapshot(session)
        session.commit()
        frozen = SnapshotInfo(snapshot_id=snapshot.snapshot_id, n_expert=snapshot.n_expert, n_proxy=snapshot.n_proxy,
                              item_kind=snapshot_item_kind(session, snapshot.snapshot_id))
    get_run_logger().info("snapshot %s: %d expert, %d proxy, %s items", frozen.snapshot_id, frozen.n_expert,
                          frozen.n_proxy, frozen.item_kind)
    return frozen


@task(name="check-conditions")
def check_conditions(settings: Settings, snapshot_id: str) -> ConditionReport:
    with Session(make_engine(settings.resolved_store_url)) as session:
        triples = load_snapshot_triples(session, snapshot_id)
    from policies.features.conditions import run_condition_tests  # torch: see the module docstring

    report = run_condition_tests(triples["expert"], triples["proxy"], snapshot_id, seed=settings.training_seed)
    get_run_logger().info("snapshot %s: plan %s (%s)", snapshot_id, report.plan, "; ".join(report.reasons))
    return report


@task(name="train-on-gpu-queue", retries=2, retry_delay_seconds=RETRY_DELAYS_S, retry_condition_fn=transient)
def dispatch_training(request: TrainingRequest) -> TrainingResult:
    return train_on_gpu_queue(TRAIN_TASK, request, "training task")


@task(name="evaluate-checkpoints", retries=2, retry_delay_seconds=RETRY_DELAYS_S, retry_condition_fn=transient)
def evaluate(settings: Settings, snapshot_id: str, training: TrainingResult) -> Evaluation:
    request = EvaluationRequest(checkpoints=training.checkpoints, store_url=settings.resolved_store_url,
                                snapshot_id=snapshot_id, seed=settings.training_seed)
    return Evaluation.model_validate(run_on_queue(EVALUATE_TASK, request, CPU_QUEUE))  # reads only: safe to resend


@task(name="gate")
def gate(settings: Settings, evaluation: Evaluation) -> GateDecision:
    """The gate's decision; with too little held out to judge on, a block that still names the checkpoint the
    rules would pick, which an override (`proxyloop override`) can then release."""
    rules = gate_rules(settings, evaluation.language_model)
    if evaluation.language_model:
        decision = decide_language_model(evaluation.evaluations, evaluation.baseline_accuracy, rules,
                                         evaluation.base_topk_mass)
    else:
        decision = decide(evaluation.evaluations, evaluation.baseline_accuracy, rules)
    unjudgeable = too_little_heldout(evaluation, rules)
    if unjudgeable is not None:  # the rules' own verdict stays readable, and the last word says what counts
        pick = f"; an override releases step {decision.checkpoint.step}" if decision.checkpoint is not None else ""
        decision = decision.model_copy(update={"decision": "block", "reasons": [
            unjudgeable, *decision.reasons, f"blocked: too little held out to judge a release on (above){pick}"]})
    get_run_logger().info("gate: %s (%s)", decision.decision, "; ".join(decision.reasons))
    return decision


def record(settings: Settings, run: RetrainRunRecord, status: str) -> None:
    with Session(make_engine(settings.resolved_store_url)) as session:
        record_run(session, run, status)
        session.commit()


class RunNotFound(LookupError):
    pass


def load_run(run_id: str) -> RetrainRunRecord:
    with Session(make_engine(get_settings().resolved_store_url)) as session:
        run = session.get(RetrainRun, run_id)
        if run is None:
            raise RunNotFound(f"no retrain run {run_id!r}; `proxyloop runs` lists them")
        return run_record(run)


class StageMissing(ValueError):
    """A stage flow was run on a run whose earlier stage has not completed."""


def _needs(run: RetrainRunRecord, *fields: str) -> None:
    missing = [f for f in fields if getattr(run, f) is None]
    if missing:
        raise StageMissing(f"run {run.run_id} has no {', '.join(missing)} yet; run the earlier stages first")


def _chat_stage1(settings: Any, run: RetrainRunRecord) -> None:
    """Snapshot pairs → JSONL → stage 1 (DPO on the proxy pairs, in the chat reading) → the condition tests;
    fills the run's chat data, stage 1 and condition report."""
    assert run.snapshot is not None
    try:
        run.chat_data = write_chat_data(settings, run.run_id, run.snapshot.snapshot_id)
    except NoTextPairs as exc:  # a refusal with its reason, as the plan's own; not a failed run
        run.conditions = ConditionReport(snapshot_id=run.snapshot.snapshot_id, n_expert=run.snapshot.n_expert,
                                         n_proxy=run.snapshot.n_proxy, checks=[], plan="refuse",
                                         reasons=[f"refuse: {exc}"])
        return
    base_model = chat_base_model(settings, run.chat_data.heldout)
    if run.chat_data.proxy:
        request = recipe_request("stage1", chat_recipe(settings), run_id=f"{run.run_id}-stage1", base_model=base_model,
                                 dataset=run.chat_data.proxy, output_dir=settings.runs_dir / run.run_id / "stage1")
        run.stage1_request = request
        record(settings, run, "stage1")
        result = dispatch_lm_training(request)
        run.stage1 = TrainingRecord(**result.model_dump(), task_id=request.run_id, queue=GPU_QUEUE)
    run.conditions = text_conditions(settings, run, base_model)


def _train_chat_policy(settings: Any, run: RetrainRunRecord) -> TrainingResult:
    """What the plan trains after stage 1 (nothing for proxy_as_is: the stage-1 model is the policy)."""
    assert run.chat_data is not None and run.conditions is not None
    base_model = chat_base_model(settings)
    stage1 = run.stage1.checkpoints[-1].path if run.stage1 is not None else ""
    request = plan_request(run.conditions.plan, chat_recipe(settings), run_id=run.run_id, base_model=base_model,
                           stage1_checkpoint=stage1, expert_pairs=run.chat_data.expert,
                           output_dir=settings.runs_dir / run.run_id / "lm")
    if request is None:
        assert run.stage1 is not None and run.stage1_request is not None
        run.training_request = run.stage1_request
        return TrainingResult.model_validate(run.stage1.model_dump())
    run.training_request = request
    record(settings, run, "training")
    return dispatch_lm_training(request)


@flow(name="check-conditions")
def check_conditions_flow(run_id: str | None = None) -> RetrainRunRecord:
    """Freeze a snapshot and run the sufficient-condition tests on it (chat: after stage 1, on its model)."""
    settings = get_settings()
    run = RetrainRunRecord(run_id=run_id or str(flow_run.get_id() or uuid.uuid4()))
    run.snapshot = freeze(settings)
    if run.is_chat:
        _chat_stage1(settings, run)
    else:
        run.conditions = check_conditions(settings, run.snapshot.snapshot_id)
    assert run.conditions is not None
    publish_condition_report(settings, run.run_id, run.conditions)
    return run


@flow(name="evaluate-and-gate")
def evaluate_and_gate_flow(run_id: str) -> RetrainRunRecord:
    """Evaluate a run's checkpoints on held-out expert data and apply the release gate."""
    settings = get_settings()
    run = load_run(run_id)
    _needs(run, "snapshot", "training")
    assert run.snapshot is not None and run.training is not None
    if run.is_chat:
        _needs(run, "chat_data")
        assert run.chat_data is not None
        if not isinstance(run.training_request, LMTrainingRequest):
            raise StageMissing(f"run {run_id} is a chat run without a language-model training request")
        run.evaluation = evaluate_lm(run.training_request.base_model, run.chat_data.heldout, run.training)
    else:
        run.evaluation = evaluate(settings, run.snapshot.snapshot_id, run.training)
    run.gate = gate(settings, run.evaluation)
    publish_gate_decision(settings, run_id, run.gate, run.evaluation.evaluations,
                          base_mass=run.evaluation.base_topk_mass)
    return run


@flow(name="release")
def release_flow(run_id: str, override_reason: str | None = None, operator: str | None = None) -> ReleaseRecord:
    """Release a run's gated checkpoint; a blocked run needs `override_reason` (audited in lineage and in the
    promotion history, with `operator`, default the OS user). One release of a run at a time (`release_lock`)."""
    settings = get_settings()
    with release_lock(settings.registry_dir, run_id):
        return _release(settings, run_id, override_reason, operator)


def _release(settings: Settings, run_id: str, override_reason: str | None, operator: str | None) -> ReleaseRecord:
    run = load_run(run_id)
    if run.release is not None:  # a repeated approve/override, or a flow re-run: never a second version
        get_run_logger().info("run %s: already released as %s v%d", run_id, run.release.policy, run.release.version)
        return run.release
    _needs(run, "snapshot", "gate")
    assert run.snapshot is not None and run.gate is not None
    decision = run.gate
    if decision.checkpoint is None:
        raise ValueError(f"run {run_id} has no evaluated checkpoint to release")
    who = operator or current_user()
    override = None
    if decision.decision == "block":
        if not (override_reason or "").strip():
            raise PermissionError(f"run {run_id} was blocked by the gate: {decision.reasons}; "
                                  "release it only with an override reason")
        override = {"by": who, "reason": override_reason, "at": utcnow().isoformat(),
                    "gate_reasons": decision.reasons}
        get_run_logger().warning("run %s: gate overridden by %s: %s", run_id, who, override_reason)
    dumped = run.model_dump(mode="json")
    lineage = {key: dumped[key] for key in ("snapshot", "conditions", "training_request", "training", "gate")}
    lineage.update(override=override, flow_run_id=run_id)
    evidence = ReleaseEvidence(who=who, why=override_reason or f"gate decision {decision.decision!r} for run {run_id}",
                               gate=dumped["gate"], snapshot_id=run.snapshot.snapshot_id,
                               override=override is not None)
    policy = settings.chat_policy_name if run.is_chat else settings.policy_name
    version = finish_release_of_run(settings, policy, run_id, decision.checkpoint.path, evidence=evidence)
    if version is not None:
        get_run_logger().warning("run %s: an earlier release attempt registered %s v%d; finishing that release",
                                 run_id, version.policy, version.version)
    elif run.is_chat:
        lineage["chat_data"] = dumped["chat_data"]  # the JSONL files and the snapshot they came from
        from policies.lm.release import release_causal_lm  # torch, here: a flow run's start stays without it

        version = release_causal_lm(settings, Path(decision.checkpoint.path), lineage, evidence=evidence)
    else:
        version = release_checkpoint(settings, Path(decision.checkpoint.path), lineage, evidence=evidence)
    run.release = ReleaseRecord(policy=version.policy, version=version.version, alias="production", path=version.path,
                                override=override, family="causal_lm" if run.is_chat else "feature")
    publish_release(settings, run.release)
    record(settings, run, "released")
    get_run_logger().info("run %s: released %s v%d as production", run_id, version.policy, version.version)
    return run.release


@flow(name="retrain")
def retrain(expert_total: int = 0, proxy_total: int = 0) -> RetrainRunRecord:
    """Retrain the policy on a fresh snapshot and release it if the gate allows."""
    settings = get_settings()
    run = RetrainRunRecord(run_id=str(flow_run.get_id() or uuid.uuid4()),
                           trigger={"expert_total": expert_total, "proxy_total": proxy_total})
    record(settings, run, "running")

    def stage(name: str, started: float) -> None:
        run.timings_s[name] = round(time.perf_counter() - started, 3)

    try:
        started = time.perf_counter()
        checked = check_conditions_flow.fn(run.run_id)  # .fn: artifacts land on this run
        run.snapshot, run.conditions, run.chat_data = checked.snapshot, checked.conditions, checked.chat_data
        run.stage1_request, run.stage1 = checked.stage1_request, checked.stage1
        stage("conditions", started)
        assert run.snapshot is not None and run.conditions is not None
        if run.conditions.plan == "refuse":
            record(settings, run, "refused")
            return run

        started = time.perf_counter()
        if run.is_chat:
            training = _train_chat_policy(settings, run)
        else:
            request = TrainingRequest(
                run_id=run.run_id, snapshot_id=run.snapshot.snapshot_id, store_url=settings.resolved_store_url,
                plan=run.conditions.plan, output_dir=str(settings.runs_dir / run.run_id), seed=settings.training_seed,
            )
            run.training_request = request
            training = dispatch_training(request)
        run.training = TrainingRecord(**training.model_dump(), task_id=run.run_id, queue=GPU_QUEUE)
        stage("training", started)
        record(settings, run, "trained")

        started = time.perf_counter()
        gated = evaluate_and_gate_flow.fn(run.run_id)
        run.evaluation, run.gate = gated.evaluation, gated.gate
        stage("evaluate_and_gate", started)
        assert run.gate is not None
        if run.gate.decision == "block":
            record(settings, run, "blocked")
            return run
        record(settings, run, "gated")

        started = time.perf_counter()
        run.release = release_flow.fn(run.run_id)
        stage("release", started)
        record(settings, run, "released")
        return run
    except Exception as exc:
        run.error = f"{type(exc).__name__}: {exc}"
        record(settings, run, "failed")
        raise
