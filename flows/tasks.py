"""The retrain flow's tasks: each one step, calling into ingest, workers or policies.

Transient failures (broker or database hiccups) are retried with backoff; a training task
that failed on the worker is not: it fails the flow run with the worker's error.

What needs torch (the feature family's condition tests, the chat base model, the language-model
workers' task names) is imported in the task that uses it, so that a flow run's subprocess starts
without torch (tests/flows/test_import_cost.py; docs/benchmarks.md, trigger latency).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from celery.result import AsyncResult
from kombu.exceptions import OperationalError as KombuOperationalError
from prefect import get_run_logger, task
from redis.exceptions import RedisError
from sqlalchemy.orm import Session
from tenacity import RetryCallState, Retrying, retry_if_result, stop_after_delay, wait_fixed

from ground.schemas import (
    ChatData,
    ConditionReport,
    Evaluation,
    EvaluationRequest,
    GateDecision,
    LMTrainingRequest,
    RetrainRunRecord,
    SnapshotInfo,
    TextConditionRequest,
    TrainingRequest,
    TrainingResult,
)
from ground.settings import Settings
from ingest.store import freeze_snapshot, load_snapshot_triples, make_engine, record_run
from ingest.text_snapshot import snapshot_item_kind
from policies.lm.gate import decide_language_model
from policies.plan_choice import no_proxy_report
from policies.promotion import decide, gate_rules
from workers.app import CPU_QUEUE, EVALUATE_TASK, GPU_QUEUE, TRAIN_TASK
from workers.app import app as celery_app
from workers.lm.plans import LMRecipe
from workers.lm.snapshot_data import write_snapshot_datasets

TASK_TIMEOUT_S = 1800
RETRY_DELAYS_S: list[float] = [2, 10, 30]


class TrainingFailed(RuntimeError):
    """A Celery task failed on its worker; retrying the flow step would repeat the failure."""


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except TrainingFailed:
        return False
    except Exception:  # noqa: BLE001 - anything else may be a hiccup worth a retry
        return True
    return True


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


@task(name="text-conditions", retries=2, retry_delay_seconds=RETRY_DELAYS_S, retry_condition_fn=_transient)
def text_conditions(settings: Settings, run: RetrainRunRecord, base_model: str) -> ConditionReport:
    """Paper 1's tests on the stage-1 model (task `proxyloop.text_conditions` on `gpu`: it runs the models);
    without proxy pairs there is nothing to test and the plan is expert_only."""
    assert run.snapshot is not None and run.chat_data is not None
    data, snapshot_id = run.chat_data, run.snapshot.snapshot_id
    from workers.lm.tasks import TEXT_CONDITIONS_TASK  # torch: see the module docstring

    if run.stage1 is None or run.stage1_request is None:  # both are set together, by stage 1
        report = no_proxy_report(snapshot_id, data.n_expert_train + data.n_heldout)
    else:
        request = TextConditionRequest(
            snapshot_id=snapshot_id, base_model=base_model, stage1_checkpoint=run.stage1.checkpoints[-1].path,
            expert_pairs=data.expert, proxy_pairs=data.proxy, n_expert=data.n_expert_train + data.n_heldout,
            n_proxy=data.n_proxy, beta=float(run.stage1_request.config["beta"]), seed=settings.training_seed)
        sent = celery_app.send_task(TEXT_CONDITIONS_TASK, queue=GPU_QUEUE, args=[request.model_dump(mode="json")])
        report = ConditionReport.model_validate(wait_for_task(sent.id))
    get_run_logger().info("snapshot %s: plan %s (%s)", snapshot_id, report.plan, "; ".join(report.reasons))
    return report


# Errors of the Celery result backend or broker being away (the embedded Redis restarting, say).
BACKEND_ERRORS = (OSError, KombuOperationalError, RedisError)
LOST_AFTER_S = 30.0  # PENDING this long after an outage, the task died with the broker: send it again


def wait_for_task(task_id: str, resend: Callable[[], object] | None = None,
                  timeout_s: float = TASK_TIMEOUT_S) -> dict[str, Any]:
    """Poll a Celery task, logging its progress; a failed task raises with the worker's error.

    A result-backend outage is waited out (the worker keeps training, see workers.app.report_progress).
    If afterwards the task stays PENDING for LOST_AFTER_S, its message was lost with the broker (the
    embedded Redis keeps nothing across a restart) and `resend` sends it again: the task id is the
    run id, and a worker returns a finished run's stored result or resumes from its checkpoint.
    """
    logger = get_run_logger()
    result = AsyncResult(task_id, app=celery_app)
    seen: list[object] = [None]
    outage: dict[str, float | None] = {"since": None, "back": None}

    def state() -> str:
        try:
            current = result.state
        except BACKEND_ERRORS as exc:
            if outage["since"] is None:
                logger.warning("task %s: the result backend is unreachable (%s); waiting for it", task_id, exc)
                outage["since"] = time.monotonic()
            return "UNREACHABLE"
        if outage["since"] is not None:
            logger.info("task %s: the result backend is back; the task is %s", task_id, current)
            outage["since"], outage["back"] = None, time.monotonic()
        if current in ("FAILURE", "REVOKED"):
            raise TrainingFailed(f"task {task_id} {current.lower()} on the worker: {result.result!r}\n"
                                 f"{result.traceback}")
        if current == "PROGRESS" and result.info != seen[-1]:
            seen.append(result.info)
            logger.info("task %s: %s", task_id, result.info)
        back = outage["back"]
        if current != "PENDING":
            outage["back"] = None
        elif back is not None and time.monotonic() - back > LOST_AFTER_S and resend is not None:
            logger.warning("task %s: still pending %.0f s after the outage, so lost with the broker; sending it "
                           "again", task_id, LOST_AFTER_S)
            resend()
            outage["back"] = None
        return current

    def timed_out(retry_state: RetryCallState) -> str:
        raise TrainingFailed(f"task {task_id} did not finish within {timeout_s:.0f} s")

    poll = Retrying(retry=retry_if_result(lambda current: current != "SUCCESS"), wait=wait_fixed(0.5),
                    stop=stop_after_delay(timeout_s), retry_error_callback=timed_out)
    poll(state)
    value: dict[str, Any] = result.get(timeout=10)
    return value


@task(name="train-on-gpu-queue", retries=2, retry_delay_seconds=RETRY_DELAYS_S, retry_condition_fn=_transient)
def dispatch_training(request: TrainingRequest) -> TrainingResult:
    return _train_on_gpu_queue(TRAIN_TASK, request, "training task")


def _train_on_gpu_queue(task_name: str, request: TrainingRequest | LMTrainingRequest, what: str) -> TrainingResult:
    """Send a training task and wait for its `TrainingResult`. The task id is the run id: a retried
    dispatch finds the same task, and the worker's result is idempotent."""
    def send() -> object:
        return celery_app.send_task(task_name, args=[request.model_dump(mode="json")], queue=GPU_QUEUE,
                                    task_id=request.run_id)

    send()
    get_run_logger().info("run %s: %s sent to queue %s", request.run_id, what, GPU_QUEUE)
    return TrainingResult.model_validate(wait_for_task(request.run_id, resend=send))


@task(name="evaluate-checkpoints", retries=2, retry_delay_seconds=RETRY_DELAYS_S, retry_condition_fn=_transient)
def evaluate(settings: Settings, snapshot_id: str, training: TrainingResult) -> Evaluation:
    request = EvaluationRequest(checkpoints=training.checkpoints, store_url=settings.resolved_store_url,
                                snapshot_id=snapshot_id, seed=settings.training_seed)
    sent = celery_app.send_task(EVALUATE_TASK, queue=CPU_QUEUE, args=[request.model_dump(mode="json")])
    return Evaluation.model_validate(wait_for_task(sent.id))


@task(name="write-preference-data", retries=2, retry_delay_seconds=RETRY_DELAYS_S)
def write_chat_data(settings: Settings, run_id: str, snapshot_id: str) -> ChatData:
    data = write_snapshot_datasets(settings.resolved_store_url, snapshot_id, settings.runs_dir / run_id / "data")
    get_run_logger().info("run %s: snapshot %s → %d expert + %d proxy training pairs, %d held out", run_id,
                          snapshot_id, data.n_expert_train, data.n_proxy, data.n_heldout)
    return data


@task(name="chat-base-model", retries=1, retry_delay_seconds=RETRY_DELAYS_S)
def chat_base_model(settings: Settings) -> str:
    from workers.lm.base_model import ensure_chat_base_model  # torch: see the module docstring

    path = ensure_chat_base_model(settings.chat_base_model, settings.models_dir, seed=settings.training_seed)
    get_run_logger().info("chat base model %s: %s", settings.chat_base_model, path)
    return str(path)


def chat_recipe(settings: Settings) -> LMRecipe:
    """The bench's recipe (LMRecipe's defaults), with `PROXYLOOP_CHAT_RECIPE`'s overrides and the run seed."""
    overrides = {"seed": settings.training_seed, **settings.chat_recipe}
    unknown = sorted(set(overrides) - set(LMRecipe().to_dict()))
    if unknown:
        raise ValueError(f"PROXYLOOP_CHAT_RECIPE has unknown keys {unknown}; known: {sorted(LMRecipe().to_dict())}")
    return LMRecipe(**overrides)


@task(name="train-lm-on-gpu-queue", retries=2, retry_delay_seconds=RETRY_DELAYS_S, retry_condition_fn=_transient)
def dispatch_lm_training(request: LMTrainingRequest) -> TrainingResult:
    from workers.lm.tasks import TRAIN_LM_TASK  # torch: see the module docstring

    return _train_on_gpu_queue(TRAIN_LM_TASK, request, f"{request.method} training of {request.base_model}")


@task(name="evaluate-lm-checkpoints", retries=2, retry_delay_seconds=RETRY_DELAYS_S, retry_condition_fn=_transient)
def evaluate_lm(base_model: str, heldout_path: str, training: TrainingResult) -> Evaluation:
    from workers.lm.tasks import EVALUATE_LM_TASK  # torch: see the module docstring

    request = EvaluationRequest(checkpoints=training.checkpoints, base_model=base_model, heldout_path=heldout_path)
    sent = celery_app.send_task(EVALUATE_LM_TASK, queue=CPU_QUEUE, args=[request.model_dump(mode="json")])
    return Evaluation.model_validate(wait_for_task(sent.id))


@task(name="gate")
def gate(settings: Settings, evaluation: Evaluation) -> GateDecision:
    rules = gate_rules(settings, evaluation.language_model)
    if evaluation.language_model:
        decision = decide_language_model(evaluation.evaluations, evaluation.baseline_accuracy, rules,
                                         evaluation.base_topk_mass)
    else:
        decision = decide(evaluation.evaluations, evaluation.baseline_accuracy, rules)
    get_run_logger().info("gate: %s (%s)", decision.decision, "; ".join(decision.reasons))
    return decision


def record(settings: Settings, run: RetrainRunRecord, status: str) -> None:
    with Session(make_engine(settings.resolved_store_url)) as session:
        record_run(session, run, status)
        session.commit()
