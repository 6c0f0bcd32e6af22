"""Celery tasks for feature-vector policies (paper 1), and the training the `train` task runs.

The training lives next to its task because together they are one step of a label's path: the
task re-fetches the snapshot and calls `train_feature_policy`; only the task (and its tests) call it.

Thin tasks: arguments are ids and paths; data is re-fetched from the store inside. Idempotent by
run id (a finished run returns its stored result), which makes `acks_late` redelivery safe. The output
directory belongs to the run recorded in its `run.json` (as for language models,
`workers/lm/training/checkpoint.py`): a request for another run id, plan, snapshot or recipe is refused
instead of being handed that run's result or having its checkpoints overwritten. `result.json` is written
atomically; one torn by an older worker is retrained, with a warning, rather than failing every redelivery.

Training: stage 1 learns τ̃, Θ̃, φ̃ from proxy triples; stage 2 learns only the adapter π̄† from
expert triples, with policies.features.model's recipe (the one the condition tests score the plans
with). Each plan is a choice of which stages run and which parameters they touch. Every checkpoint
holds the weights (safetensors) and its step/loss/config (JSON) so a run can be evaluated, compared
and resumed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from celery import Task
from pydantic import ValidationError
from safetensors.torch import save_file
from sqlalchemy.orm import Session
from torch import nn

from ground.schemas import (
    CheckpointRef,
    Evaluation,
    EvaluationRequest,
    FeatureTriple,
    Plan,
    TrainingRequest,
    TrainingResult,
)
from ingest.store import LabelKind, load_snapshot_triples, make_engine, split_expert
from policies.features.fit_recipe import EXPERT_ONLY, FINE_TUNE, FINE_TUNE_PRIOR
from policies.features.fitting import fit_preferences, fit_stage1
from policies.features.model import DirectPolicy, TwoStageConfig, TwoStagePolicy, triples_to_tensors
from policies.features.outputs import OutputSupport, output_support, widened
from policies.features.recipe import TwoStageRecipe, fit_two_stage_adapter, resolve_recipe
from policies.plan_choice import CHANCE_ACCURACY
from workers.app import EVALUATE_TASK, PING_TASK, TRAIN_TASK, app, report_progress
from workers.device import select_device
from workers.features.evaluate import evaluate_checkpoint, expert_only_baseline, heldout_inputs
from workers.lm.training.checkpoint import (
    RESULT_FILE,
    check_run_dir,
    read_record,
    record_run,
    run_dir_lock,
    write_result,
)

log = logging.getLogger("proxyloop.workers")

Progress = Callable[[dict[str, object]], None]
PROGRESS_EVERY = 25  # steps between progress messages


def build_model(plan: Plan, config: TwoStageConfig) -> nn.Module:
    if plan == "expert_only":
        return DirectPolicy(config.input_dim, config.n_outputs, config.hidden)
    return TwoStagePolicy(config)


def model_config(plan: Plan, config: TwoStageConfig) -> dict[str, object]:
    return {"family": "direct" if plan == "expert_only" else "two_stage", "model": config.to_dict()}


def _save_checkpoint(model: nn.Module, out: Path, step: int, loss: float, meta: dict[str, object],
                     support: OutputSupport) -> CheckpointRef:
    """The model as it answers over the output ids by name (`widened`), whatever indices it was fitted in."""
    path = out / f"checkpoint-{step:06d}"
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in widened(model, support).state_dict().items()},
              str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(meta["config"], indent=2))
    (path / "state.json").write_text(json.dumps({"step": step, "loss": loss, **meta}, indent=2))
    return CheckpointRef(step=step, path=str(path))


def expert_steps(plan: Plan, request: TrainingRequest, recipe: TwoStageRecipe) -> int:
    """Steps of the expert stage: the request's, else the plan's recipe."""
    if request.stage2_epochs is not None:
        return request.stage2_epochs
    return {"two_stage": recipe.adapter_stage.steps, "fine_tune": FINE_TUNE.steps}.get(plan, EXPERT_ONLY.steps)


def _fit_expert_stage(
    plan: Plan, model: nn.Module, data: tuple[torch.Tensor, torch.Tensor, torch.Tensor], steps: int, seed: int,
    recipe: TwoStageRecipe, on_step: Callable[[int, float], None], after_step: Callable[[int], None],
    unlabelled: torch.Tensor | None = None,
) -> float:
    """Stage 2 by plan: the adapter alone with its prior chosen by cross-validation (two_stage, the
    recipe bench/appendix_d.py reports), every weight pulled toward stage 1 (fine_tune), or a direct
    policy from scratch (expert_only). `unlabelled` (the proxy triples' x) is where two_stage's bag of adapters is
    distilled into the one it serves."""
    x, y_w, y_l = data
    if plan == "two_stage":
        assert isinstance(model, TwoStagePolicy)
        return fit_two_stage_adapter(model, x, y_w, y_l, seed, recipe, on_step, after_step, unlabelled)
    for p in model.parameters():
        p.requires_grad_(True)
    if plan == "fine_tune":
        return fit_preferences(model, list(model.parameters()), x, y_w, y_l, steps, FINE_TUNE.lr, seed,  # type: ignore[arg-type]
                               on_step, anchor=FINE_TUNE_PRIOR / x.shape[0], after_step=after_step)
    return fit_preferences(model, list(model.parameters()), x, y_w, y_l, steps, EXPERT_ONLY.lr, seed,  # type: ignore[arg-type]
                           on_step, weight_decay=EXPERT_ONLY.weight_decay, after_step=after_step)


def train_feature_policy(
    request: TrainingRequest, proxy: Sequence[FeatureTriple], expert_train: Sequence[FeatureTriple],
    device: torch.device, worker: str, progress: Progress, heldout: Sequence[FeatureTriple] = (),
) -> TrainingResult:
    """Run the plan's stages; checkpoint after stage 1 (step 0) and every `checkpoint_every` steps
    of the expert stage. The two-stage recipe is policies.features.recipe.TWO_STAGE (the bench's),
    with the request's step counts and adapter size where it names them (`resolve_recipe`).

    The outputs are those of `output_support`: proxy triples using an id only a stray proxy event uses are left
    out. `heldout` (the expert triples kept for evaluation) is never trained on; its ids count as used by an
    expert, so the model answers every output evaluation asks about. The fit sees the ids it uses as 0..K-1
    (`OutputSupport.dense`) and the checkpoints answer over the ids by name."""
    started = time.perf_counter()
    torch.manual_seed(request.seed)
    out = Path(request.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    support = output_support([*expert_train, *heldout], proxy)
    proxy, expert_train = support.dense(support.proxy), support.dense(expert_train)
    everything = [*proxy, *expert_train]
    recipe = resolve_recipe(request)
    config = recipe.config(len(everything[0].x), support.n_fitted)
    model = build_model(request.plan, config).to(device)
    saved = replace(config, n_outputs=support.n_outputs)
    meta: dict[str, object] = {
        "plan": request.plan, "config": model_config(request.plan, saved), "run_id": request.run_id,
    }

    curve: list[dict[str, object]] = []

    def report(stage: str, total: int) -> Callable[[int, float], None]:
        def on_step(step0: int, loss: float) -> None:  # loss before update step0 + 1
            step = step0 + 1
            curve.append({"stage": stage, "step": step, "loss": loss})
            if step % PROGRESS_EVERY == 0 or step == total:
                progress({"stage": stage, "step": step, "of": total, "loss": round(loss, 5)})
        return on_step

    checkpoints: list[CheckpointRef] = []
    loss = float("nan")
    proxy_x: torch.Tensor | None = None
    def to_device(triples: Sequence[FeatureTriple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y_w, y_l = triples_to_tensors(triples)
        return x.to(device), y_w.to(device), y_l.to(device)

    if request.plan in ("two_stage", "proxy_as_is", "fine_tune"):
        assert isinstance(model, TwoStagePolicy)
        xp, wp, lp = to_device(proxy)
        proxy_x = xp
        stage1 = recipe.proxy_stage
        loss = fit_stage1(model, xp, wp, lp, request.seed, stage1, report("proxy", stage1.steps))
        checkpoints.append(_save_checkpoint(model, out, 0, loss, meta, support))
    if request.plan in ("two_stage", "fine_tune", "expert_only"):
        total = expert_steps(request.plan, request, recipe)

        def after_expert_step(step: int) -> None:
            if step % request.checkpoint_every == 0 or step == total:
                last = float(curve[-1]["loss"]) if curve else float("nan")  # type: ignore[arg-type]
                checkpoints.append(_save_checkpoint(model, out, step, last, meta, support))

        loss = _fit_expert_stage(request.plan, model, to_device(expert_train), total, request.seed, recipe,
                                 report("expert", total), after_expert_step, proxy_x)
    (out / "curve.json").write_text(json.dumps(curve))
    return TrainingResult(
        run_id=request.run_id, device=str(device), worker=worker, checkpoints=checkpoints,
        final_loss=loss, seconds=time.perf_counter() - started,
    )


# The Celery tasks.


def _snapshot(store_url: str, snapshot_id: str) -> dict[LabelKind, list[FeatureTriple]]:
    with Session(make_engine(store_url)) as session:
        return load_snapshot_triples(session, snapshot_id)


def feature_identity(request: TrainingRequest) -> dict[str, Any]:
    """What makes two training requests the same run: all but where it is written and the store's URL (which may
    hold a password, and names the same snapshot from another host)."""
    return request.model_dump(mode="json", exclude={"output_dir", "store_url"})


def finished_result(out: Path) -> dict[str, Any] | None:
    """The stored result of a finished run; None when there is none, or (with a warning) when it is not a
    TrainingResult, so a torn file means retraining, not a failure on every redelivery."""
    stored = read_record(out / RESULT_FILE)
    if stored is None:
        return None
    try:
        return TrainingResult.model_validate(stored).model_dump(mode="json")
    except ValidationError as error:
        log.warning("%s is not a training result (%s): retraining", out / RESULT_FILE, error)
        return None


@app.task(name=TRAIN_TASK, bind=True, acks_late=True)
def train(self: Task, request: dict[str, Any]) -> dict[str, Any]:
    req = TrainingRequest.model_validate(request)
    with run_dir_lock(Path(req.output_dir)):  # a second delivery waits, then returns this one's result
        return _train(self, req)


def _train(self: Task, req: TrainingRequest) -> dict[str, Any]:
    out = Path(req.output_dir)
    identity = feature_identity(req)
    check_run_dir(out, identity)  # another run's directory: ForeignRunError, nothing read or written
    finished = finished_result(out)
    if finished is not None:
        log.info("run %s already finished; returning its result", req.run_id)
        return finished
    record_run(out, identity)
    # When the worker picked the run up: operators and bench/trigger_latency.py read it.
    (out / "started.json").write_text(json.dumps({"started_at": time.time(), "worker": self.request.hostname}))
    triples = _snapshot(req.store_url, req.snapshot_id)
    expert_train, heldout = split_expert(triples["expert"])
    device = select_device()
    log.info("run %s: plan %s on %s, %d proxy / %d expert triples", req.run_id, req.plan, device,
             len(triples["proxy"]), len(expert_train))

    def progress(meta: dict[str, object]) -> None:
        report_progress(self, {"run_id": req.run_id, "device": str(device), **meta})
        log.info("run %s: %s", req.run_id, meta)

    result = train_feature_policy(req, triples["proxy"], expert_train, device, self.request.hostname or "", progress,
                                  heldout)
    return write_result(out, result.model_dump(mode="json"))


@app.task(name=PING_TASK)
def ping() -> str:
    """An empty task: a health probe for the queue path and the floor of task latency."""
    return "pong"


@app.task(name=EVALUATE_TASK, bind=True, acks_late=True)
def evaluate(self: Task, request: dict[str, Any]) -> dict[str, Any]:
    """An `EvaluationRequest` (store_url, snapshot_id, seed, checkpoints) → an `Evaluation`, as JSON."""
    req = EvaluationRequest.model_validate(request)
    if req.store_url is None or req.snapshot_id is None:
        raise ValueError("a feature-policy evaluation needs store_url and snapshot_id")
    triples = _snapshot(req.store_url, req.snapshot_id)
    expert_train, heldout = split_expert(triples["expert"])
    if not heldout:  # a retrain proxy labels alone triggered: nothing to judge on, and the gate blocks on n_heldout 0
        log.warning("snapshot %s has no held-out expert triples: no checkpoint evaluated", req.snapshot_id)
        return Evaluation(evaluations=[], baseline_accuracy=CHANCE_ACCURACY, n_heldout=0, n_heldout_inputs=0,
                          language_model=False).model_dump(mode="json")
    evaluations = [evaluate_checkpoint(ref, heldout) for ref in req.checkpoints]
    support = output_support(triples["expert"], triples["proxy"])  # the outputs the trained policy was fitted on
    baseline = expert_only_baseline(support.dense(expert_train), support.dense(heldout), support.n_fitted, req.seed)
    log.info("snapshot %s: %d checkpoints evaluated, expert-only baseline %.3f", req.snapshot_id, len(evaluations),
             baseline)
    return Evaluation(evaluations=evaluations, baseline_accuracy=baseline, n_heldout=len(heldout),
                      n_heldout_inputs=heldout_inputs(heldout), language_model=False).model_dump(mode="json")
