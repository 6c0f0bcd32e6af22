"""Training of feature-vector policies (paper 1): proxy stage, adapter stage, checkpoints.

Stage 1 learns τ̃, Θ̃, φ̃ from proxy triples; stage 2 learns only the adapter π̄† from expert
triples. Each plan is a choice of which stages run and which parameters they touch. Every
checkpoint holds the weights (safetensors) and its step/loss/config (JSON) so a run can be
evaluated, compared and resumed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ingest.schemas import CheckpointRef, FeatureTriple, Plan, TrainingRequest, TrainingResult
from policies.model import (
    DirectPolicy,
    TwoStageConfig,
    TwoStagePolicy,
    preference_loss,
    triples_to_tensors,
)

Progress = Callable[[dict[str, object]], None]
LEARNING_RATE = 1e-2


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


def _fit(
    model: nn.Module, params: list[nn.Parameter], data: tuple[torch.Tensor, ...], steps: int,
    on_step: Callable[[int, float], None],
) -> float:
    """Full-batch Adam: these data sets are a few thousand rows of a few features."""
    x, y_w, y_l = data
    optimiser = torch.optim.Adam(params, lr=LEARNING_RATE)
    loss_value = float("nan")
    for step in range(1, steps + 1):
        optimiser.zero_grad()
        loss = preference_loss(model.log_probs(x), y_w, y_l)  # type: ignore[operator]
        loss.backward()
        optimiser.step()
        loss_value = float(loss.detach())
        on_step(step, loss_value)
    return loss_value


def train_feature_policy(
    request: TrainingRequest, proxy: Sequence[FeatureTriple], expert_train: Sequence[FeatureTriple],
    device: torch.device, worker: str, progress: Progress,
) -> TrainingResult:
    """Run the plan's stages; checkpoint the expert stage every `checkpoint_every` steps."""
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
        def on_step(step: int, loss: float) -> None:
            curve.append({"stage": stage, "step": step, "loss": loss})
            if step % 25 == 0 or step == total:
                progress({"stage": stage, "step": step, "of": total, "loss": round(loss, 5)})
        return on_step

    checkpoints: list[CheckpointRef] = []
    loss = float("nan")
    to_device = lambda t: tuple(v.to(device) for v in triples_to_tensors(t))  # noqa: E731
    if request.plan in ("two_stage", "proxy_as_is", "fine_tune"):
        assert isinstance(model, TwoStagePolicy)
        model.set_stage(1)
        loss = _fit(model, list(model.proxy_parameters()), to_device(proxy), request.stage1_epochs,
                    report("proxy", request.stage1_epochs))
        checkpoints.append(_save_checkpoint(model, out, 0, loss, meta))
    if request.plan in ("two_stage", "fine_tune", "expert_only"):
        if isinstance(model, TwoStagePolicy):
            model.set_stage(2)
            params = list(model.adapter_parameters() if request.plan == "two_stage" else model.parameters())
        else:
            params = list(model.parameters())
        report_expert = report("expert", request.stage2_epochs)

        def on_expert_step(step: int, step_loss: float) -> None:
            report_expert(step, step_loss)
            if step % request.checkpoint_every == 0 or step == request.stage2_epochs:
                checkpoints.append(_save_checkpoint(model, out, step, step_loss, meta))

        loss = _fit(model, params, to_device(expert_train), request.stage2_epochs, on_expert_step)
    (out / "curve.json").write_text(json.dumps(curve))
    return TrainingResult(
        run_id=request.run_id, device=str(device), worker=worker, checkpoints=checkpoints,
        final_loss=loss, seconds=time.perf_counter() - started,
    )
