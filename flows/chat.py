"""The chat family's Prefect tasks: snapshot pairs → JSONL, the base model, paper 1's tests on the stage-1
model, language-model training and evaluation, each sent to the workers.

What needs torch (the chat base model, the language-model workers' task names) is imported in the task
that uses it, so that a flow run's subprocess starts without torch (tests/flows/test_import_cost.py).
"""

from __future__ import annotations

from prefect import get_run_logger, task

from flows.celery_tasks import RETRY_DELAYS_S, retry_unless, run_on_queue, train_on_gpu_queue, transient
from ground.schemas import (
    ChatData,
    ConditionReport,
    Evaluation,
    EvaluationRequest,
    LMTrainingRequest,
    RetrainRunRecord,
    TextConditionRequest,
    TrainingResult,
)
from ground.settings import Settings
from policies.plan_choice import no_proxy_report
from workers.app import CPU_QUEUE, GPU_QUEUE
from workers.lm.plans import LMRecipe, MixtureRecipe, reading_recipe
from workers.lm.snapshot_data import NoTextPairs, write_snapshot_datasets


@task(name="write-preference-data", retries=2, retry_delay_seconds=RETRY_DELAYS_S,
      retry_condition_fn=retry_unless(NoTextPairs))  # a frozen snapshot's pairs will not change on a second read
def write_chat_data(settings: Settings, run_id: str, snapshot_id: str) -> ChatData:
    data = write_snapshot_datasets(settings.resolved_store_url, snapshot_id, settings.runs_dir / run_id / "data")
    get_run_logger().info("run %s: snapshot %s → %d expert + %d proxy training pairs, %d held out", run_id,
                          snapshot_id, data.n_expert_train, data.n_proxy, data.n_heldout)
    return data


@task(name="chat-base-model", retries=1, retry_delay_seconds=RETRY_DELAYS_S)
def chat_base_model(settings: Settings, heldout: str | None = None) -> str:
    """The run's base model, prepared the first time; refused when its tokenizer cannot serve what the run trains.
    Given the run's `heldout` pairs, a warning when none of them fits its context: training goes ahead (only the
    advisory indicators need a whole pair), and the gate blocks the release, naming the context (`too_little_heldout`),
    which an override can still release."""
    from workers.lm.base_model import ensure_chat_base_model  # torch: see the module docstring
    from workers.lm.evaluate import heldout_past_context

    path = ensure_chat_base_model(settings.chat_base_model, settings.models_dir, seed=settings.training_seed)
    logger = get_run_logger()
    context = heldout_past_context(str(path), heldout) if heldout else None
    if context is not None:
        logger.warning("no held-out pair of %s fits the chat base model's context of %d tokens: the run trains, but "
                       "its gate will block the release (a longer-context base, or shorter held-out pairs, would "
                       "let it judge one)", heldout, context)
    logger.info("chat base model %s: %s", settings.chat_base_model, path)
    return str(path)


def chat_recipe(settings: Settings) -> LMRecipe | MixtureRecipe:
    """The bench's recipe of the chat reading (`PROXYLOOP_CHAT_READING`: MixtureRecipe's or LMRecipe's defaults),
    with `PROXYLOOP_CHAT_RECIPE`'s overrides and the run seed. Stage 1, the condition tests and the plan's training
    follow the recipe's reading."""
    try:
        return reading_recipe(settings.chat_reading, {"seed": settings.training_seed, **settings.chat_recipe})
    except ValueError as error:
        raise ValueError(f"PROXYLOOP_CHAT_RECIPE: {error}") from None


@task(name="text-conditions", retries=2, retry_delay_seconds=RETRY_DELAYS_S, retry_condition_fn=transient)
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
        report = ConditionReport.model_validate(run_on_queue(TEXT_CONDITIONS_TASK, request, GPU_QUEUE))  # reads only
    get_run_logger().info("snapshot %s: plan %s (%s)", snapshot_id, report.plan, "; ".join(report.reasons))
    return report


@task(name="train-lm-on-gpu-queue", retries=2, retry_delay_seconds=RETRY_DELAYS_S, retry_condition_fn=transient)
def dispatch_lm_training(request: LMTrainingRequest) -> TrainingResult:
    from workers.lm.tasks import TRAIN_LM_TASK  # torch: see the module docstring

    return train_on_gpu_queue(TRAIN_LM_TASK, request, f"{request.method} training of {request.base_model}")


@task(name="evaluate-lm-checkpoints", retries=2, retry_delay_seconds=RETRY_DELAYS_S, retry_condition_fn=transient)
def evaluate_lm(base_model: str, heldout_path: str, training: TrainingResult) -> Evaluation:
    from workers.lm.tasks import EVALUATE_LM_TASK  # torch: see the module docstring

    request = EvaluationRequest(checkpoints=training.checkpoints, base_model=base_model, heldout_path=heldout_path)
    return Evaluation.model_validate(run_on_queue(EVALUATE_LM_TASK, request, CPU_QUEUE))  # reads only: safe to resend
