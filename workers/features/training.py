"""Training of feature-vector policies (paper 1): proxy stage, adapter stage, checkpoints.

Stage 1 learns τ̃, Θ̃, φ̃ from proxy triples; stage 2 learns only the adapter π̄† from expert
triples, with policies.features.model's recipe (the one the condition tests score the plans with). Each
plan is a choice of which stages run and which parameters they touch. Every
checkpoint holds the weights (safetensors) and its step/loss/config (JSON) so a run can be
evaluated, compared and resumed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ground.schemas import CheckpointRef, FeatureTriple, Plan, TrainingRequest, TrainingResult
from policies.features.fitting import (
    ADAPTER_STAGE,
    EXPERT_ONLY,
    FINE_TUNE,
    FINE_TUNE_PRIOR,
    PROXY_STAGE,
    fit_adapter,
    fit_preferences,
    fit_stage1,
)
from policies.features.model import DirectPolicy, TwoStageConfig, TwoStagePolicy, triples_to_tensors

Progress = Callable[[dict[str, object]], None]
PROGRESS_EVERY = 25  # steps between progress messages


def n_outputs_of(triples: Sequence[FeatureTriple]) -> int:
    return max(max(t.y_w, t.y_l) for t in triples) + 1


def build_model(plan: Plan, config: TwoStageConfig) -> nn.Module:
    if plan == "expert_only":
        return DirectPolicy(config.input_dim, config.n_outputs, config.hidden)
    return TwoStagePolicy(config)


def model_config(plan: Plan, config: TwoStageConfig) -> dict[str, object]:
    return {"family": "direct" if plan == "expert_only" else "two_stage", "model": config.to_dict()}


def _save_checkpoint(model: nn.Module, out: Path, step: int, loss: float, meta: dict[str, object]) -> CheckpointRef:
    path = out / f"checkpoint-{step:06d}"
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(meta["config"], indent=2))
    (path / "state.json").write_text(json.dumps({"step": step, "loss": loss, **meta}, indent=2))
    return CheckpointRef(step=step, path=str(path))


def _fit_expert_stage(
    plan: Plan, model: nn.Module, data: tuple[torch.Tensor, torch.Tensor, torch.Tensor], steps: int, seed: int,
    on_step: Callable[[int, float], None], after_step: Callable[[int], None],
) -> float:
    """Stage 2 by plan: the adapter alone (two_stage), every weight pulled toward stage 1
    (fine_tune), or a direct policy from scratch (expert_only) — the recipes of policies.features.model that
    policies.features.conditions scores the plans with."""
    x, y_w, y_l = data
    if plan == "two_stage":
        assert isinstance(model, TwoStagePolicy)
        return fit_adapter(model, x, y_w, y_l, seed, replace(ADAPTER_STAGE, steps=steps), on_step, after_step)
    for p in model.parameters():
        p.requires_grad_(True)
    if plan == "fine_tune":
        return fit_preferences(model, list(model.parameters()), x, y_w, y_l, steps, FINE_TUNE.lr, seed,  # type: ignore[arg-type]
                               on_step, anchor=FINE_TUNE_PRIOR / x.shape[0], after_step=after_step)
    return fit_preferences(model, list(model.parameters()), x, y_w, y_l, steps, EXPERT_ONLY.lr, seed,  # type: ignore[arg-type]
                           on_step, weight_decay=EXPERT_ONLY.weight_decay, after_step=after_step)


def train_feature_policy(
    request: TrainingRequest, proxy: Sequence[FeatureTriple], expert_train: Sequence[FeatureTriple],
    device: torch.device, worker: str, progress: Progress,
) -> TrainingResult:
    """Run the plan's stages; checkpoint after stage 1 (step 0) and every `checkpoint_every` steps
    of the expert stage. Step counts come from the request; learning rates, weight decay and priors
    from the recipes in policies.features.model."""
    started = time.perf_counter()
    torch.manual_seed(request.seed)
    out = Path(request.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    everything = [*proxy, *expert_train]
    config = TwoStageConfig(
        input_dim=len(everything[0].x), n_outputs=n_outputs_of(everything), simplex_dim=request.adapter_dim
    )
    model = build_model(request.plan, config).to(device)
    meta: dict[str, object] = {
        "plan": request.plan, "config": model_config(request.plan, config), "run_id": request.run_id,
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
    def to_device(triples: Sequence[FeatureTriple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y_w, y_l = triples_to_tensors(triples)
        return x.to(device), y_w.to(device), y_l.to(device)

    if request.plan in ("two_stage", "proxy_as_is", "fine_tune"):
        assert isinstance(model, TwoStagePolicy)
        recipe = replace(PROXY_STAGE, steps=request.stage1_epochs)
        xp, wp, lp = to_device(proxy)
        loss = fit_stage1(model, xp, wp, lp, request.seed, recipe, report("proxy", request.stage1_epochs))
        checkpoints.append(_save_checkpoint(model, out, 0, loss, meta))
    if request.plan in ("two_stage", "fine_tune", "expert_only"):
        total = request.stage2_epochs

        def after_expert_step(step: int) -> None:
            if step % request.checkpoint_every == 0 or step == total:
                last = float(curve[-1]["loss"]) if curve else float("nan")  # type: ignore[arg-type]
                checkpoints.append(_save_checkpoint(model, out, step, last, meta))

        loss = _fit_expert_stage(request.plan, model, to_device(expert_train), total, request.seed,
                                 report("expert", total), after_expert_step)
    (out / "curve.json").write_text(json.dumps(curve))
    return TrainingResult(
        run_id=request.run_id, device=str(device), worker=worker, checkpoints=checkpoints,
        final_loss=loss, seconds=time.perf_counter() - started,
    )
