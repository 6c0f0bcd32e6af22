"""The language-model recipe and what each plan trains: one source for the retrain flow and `bench/lm_proxy.py`.

Stage 1 is DPO of the base model, with a D-simplex bottleneck, on the proxy pairs; the condition
tests then read the stage-1 model, and the plan they choose decides what comes next:

  proxy_as_is  nothing: the stage-1 model is the policy
  two_stage    DPO on the expert pairs of the bottleneck's D×D adapter alone (paper 1's stage 2)
  fine_tune    DPO on the expert pairs of every weight, from the stage-1 model
  expert_only  DPO on the expert pairs of the base model (no proxy data at all)
  refuse       nothing is trained or released

`pooled` (DPO of the base model on proxy and expert pairs together, at equal weight: what proxyloop
did before the condition tests ran on text) is kept as the bench's baseline, not as a plan.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from ground.schemas import LMTrainingRequest, Plan

Recipe = Literal["stage1", "two_stage", "fine_tune", "expert_only", "pooled"]


@dataclass(frozen=True)
class LMRecipe:
    """Hyper-parameters of every recipe; the defaults were chosen on the bench's tuning seeds (docs/benchmarks.md)."""

    simplex_dim: int = 8
    stage1_parts: str = "all"  # "bottleneck": stage 1 trains only τ̃'s projection and Θ̃, the body frozen
    beta: float = 0.5  # bench/lm_proxy.py, tuning seeds 0-1: 0.1 left the policies' gold reward unmoved
    batch_size: int = 16
    proxy_learning_rate: float = 2e-3  # stage 1 and pooled (the tiny model); SmolLM2 wants about 1e-5
    proxy_epochs: int = 4
    proxy_max_steps: int = 0  # > 0 caps stage 1 (and pooled) at this many steps
    adapter_learning_rate: float = 5e-2  # a D×D map from a few dozen pairs: large steps, few weights
    adapter_epochs: int = 30
    expert_learning_rate: float = 2e-3  # fine_tune and expert_only (the tiny model)
    expert_epochs: int = 20
    checkpoint_every: int = 20
    max_length: int = 128
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _config(recipe: LMRecipe, learning_rate: float, epochs: int, max_steps: int = 0, **extra: Any) -> dict[str, Any]:
    return {"loss_type": "sigmoid", "beta": recipe.beta, "learning_rate": learning_rate,
            "batch_size": recipe.batch_size, "epochs": epochs, "max_steps": max_steps,
            "checkpoint_every": recipe.checkpoint_every, "log_every": max(1, recipe.checkpoint_every // 2),
            "max_length": recipe.max_length, "seed": recipe.seed, **extra}


def recipe_request(
    recipe_name: Recipe, recipe: LMRecipe, *, run_id: str, base_model: str, dataset: str, output_dir: Path | str,
) -> LMTrainingRequest:
    """The `proxyloop.train_lm` request of one recipe. `base_model` is the stage-1 checkpoint for two_stage and
    fine_tune, the base model otherwise; `dataset` the proxy pairs for stage1, the expert pairs (pooled: both)
    otherwise."""
    if recipe_name == "stage1":
        config = _config(recipe, recipe.proxy_learning_rate, recipe.proxy_epochs, recipe.proxy_max_steps,
                         simplex_dim=recipe.simplex_dim, train_parts=recipe.stage1_parts)
    elif recipe_name == "pooled":
        config = _config(recipe, recipe.proxy_learning_rate, recipe.proxy_epochs, recipe.proxy_max_steps)
    elif recipe_name == "two_stage":
        config = _config(recipe, recipe.adapter_learning_rate, recipe.adapter_epochs, train_parts="adapter")
    elif recipe_name in ("fine_tune", "expert_only"):
        config = _config(recipe, recipe.expert_learning_rate, recipe.expert_epochs)
    else:
        raise ValueError(f"unknown recipe {recipe_name!r}")
    return LMTrainingRequest(run_id=run_id, method="dpo", base_model=base_model, dataset=dataset,
                             output_dir=str(output_dir), config=config)


def plan_request(
    plan: Plan, recipe: LMRecipe, *, run_id: str, base_model: str, stage1_checkpoint: str, expert_pairs: str,
    output_dir: Path | str,
) -> LMTrainingRequest | None:
    """What `plan` trains after stage 1: None when the stage-1 model is the policy (proxy_as_is)."""
    if plan == "refuse":
        raise ValueError("plan 'refuse' trains nothing; the run stops before training")
    if plan == "proxy_as_is":
        return None
    start = base_model if plan == "expert_only" else stage1_checkpoint
    return recipe_request(plan, recipe, run_id=run_id, base_model=start, dataset=expert_pairs, output_dir=output_dir)
