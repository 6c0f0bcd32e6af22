"""The language-model recipes and what each plan trains: one source for the retrain flow and `bench/lm_proxy.py`.

Two readings of paper 1's stack (docs/design.md, "Paper 1 on language models"), one recipe type each:
`LMRecipe` for the D-simplex bottleneck, `MixtureRecipe` for the mode mixture over the frozen base (the
chat flow's default). Stage 1 trains on the proxy pairs; the condition tests then read the stage-1 model,
and the plan they choose decides what comes next:

  proxy_as_is  nothing: the stage-1 model is the policy
  two_stage    DPO on the expert pairs of the D×D adapter alone (paper 1's stage 2)
  fine_tune    DPO on the expert pairs from the stage-1 model: every weight (bottleneck), or τ̃, Θ̃ and
               the adapter (mixture: the base never moves)
  expert_only  DPO on the expert pairs of the base model (no proxy data at all), in both readings
  refuse       nothing is trained or released

`pooled` (DPO of the base model on proxy and expert pairs together, at equal weight: what proxyloop
did before the condition tests ran on text) is kept as the bench's baseline, not as a plan; like
expert_only it is full-model DPO, whichever reading the recipe is.

This module imports no torch: the flow builds its requests from it (tests/flows/test_import_cost.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from ground.schemas import LMTrainingRequest, Plan

Recipe = Literal["stage1", "two_stage", "fine_tune", "expert_only", "pooled"]
Reading = Literal["mixture", "bottleneck"]
MixtureStage = Literal["proxy", "adapter", "all"]
MIXTURE_STAGES: dict[Recipe, MixtureStage] = {"stage1": "proxy", "two_stage": "adapter", "fine_tune": "all"}
CHECKPOINTS_PER_RUN = 8  # a mixture run's checkpoints when its recipe leaves checkpoint_every at 0


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


@dataclass(frozen=True)
class MixtureRecipe:
    """The mode mixture's recipe. Chosen on tuning seeds 0-1 of bench/lm_proxy.py (docs/benchmarks.md, 2026-11-30),
    except fine_tune's (not tuned yet: stage 2's settings) and the full-model DPO of expert_only and pooled, which
    are LMRecipe's (`lm_recipe`)."""

    simplex_dim: int = 8
    mode_norm: float = 3.0  # Θ̃'s k-means start: mean norm of the mode vectors
    beta: float = 0.5
    batch_size: int = 16
    proxy_learning_rate: float = 1e-2
    proxy_epochs: int = 20  # tuning seeds 0-1, relabelled: 10 epochs gave two-stage@50 0.49 / 0.38, 20 gave 0.53 / 0.46
    adapter_learning_rate: float = 1e-2
    adapter_epochs: int = 10
    fine_tune_learning_rate: float = 1e-2
    fine_tune_epochs: int = 10
    expert_learning_rate: float = LMRecipe.expert_learning_rate  # expert_only: full-model DPO as in LMRecipe
    expert_epochs: int = LMRecipe.expert_epochs
    # Optimiser steps between a worker run's checkpoints; 0: the run's steps / CHECKPOINTS_PER_RUN, rounded up. The
    # steps are cheap (a few small tensors) and every checkpoint is evaluated, so a run keeps a few whatever its size.
    checkpoint_every: int = 0
    # Tokens per sequence wherever a pair is read: expert_only and pooled's DPO, and the base's pass over the pairs
    # that every mixture stage, the condition tests, evaluation and the acquisition terms read (`encode_pairs`; the
    # model's context if shorter). It used to leave the mixture's pairs whole, and one long pair exhausted memory.
    max_length: int = LMRecipe.max_length
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lm_recipe(self) -> LMRecipe:
        """The full-model DPO settings of expert_only and pooled (the reading does not change them)."""
        return LMRecipe(beta=self.beta, batch_size=self.batch_size, expert_learning_rate=self.expert_learning_rate,
                        expert_epochs=self.expert_epochs,
                        checkpoint_every=self.checkpoint_every or LMRecipe.checkpoint_every,
                        max_length=self.max_length, seed=self.seed)


RECIPES: dict[Reading, type[LMRecipe] | type[MixtureRecipe]] = {"mixture": MixtureRecipe, "bottleneck": LMRecipe}


def saved_max_length(recipe: dict[str, Any]) -> int:
    """The `max_length` of a saved mixture's recipe (its spec's "recipe"): the pairs of its readers are cut as its
    training pairs were. The default where a spec does not name one."""
    return int(recipe.get("max_length", MixtureRecipe.max_length))


def reading_recipe(reading: Reading, overrides: dict[str, Any]) -> LMRecipe | MixtureRecipe:
    """The reading's recipe with `overrides`; a key the reading's recipe does not have is an error."""
    kind = RECIPES[reading]
    known = sorted(kind().to_dict())
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(f"unknown keys {unknown} for the {reading} reading's {kind.__name__}; known: {known}")
    defaults = kind().to_dict()
    problems = [p for p in (_recipe_value_problem(key, value, defaults[key]) for key, value in overrides.items()) if p]
    if problems:
        raise ValueError(f"the {reading} reading's {kind.__name__}: {'; '.join(problems)}")
    return kind(**overrides)


# Recipe numbers that may be 0 (a seed; 0 = "choose for me" for the step counts); every other one must be positive,
# and simplex_dim at least 2 (a 1-simplex is a point). A bad value used to reach the worker untouched.
_MAY_BE_ZERO = frozenset({"seed", "checkpoint_every", "proxy_max_steps"})


def _recipe_value_problem(key: str, value: Any, default: Any) -> str | None:
    if isinstance(default, str):
        return None if isinstance(value, str) else f"{key} must be a string, got {value!r}"
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, int) and not is_int:
        return f"{key} must be an integer, got {value!r}"
    if not (is_int or isinstance(value, float)) or not math.isfinite(value):
        return f"{key} must be a finite number, got {value!r}"
    low = 2 if key == "simplex_dim" else 0
    if value < low or (value == 0 and key not in _MAY_BE_ZERO):
        return f"{key} must be {'at least 2' if low else 'positive' if key not in _MAY_BE_ZERO else '>= 0'}, " \
               f"got {value!r}"
    return None


def _mixture_config(recipe: MixtureRecipe, stage: MixtureStage) -> dict[str, Any]:
    """`proxyloop.train_lm`'s config of a mixture stage: the reading, the stage and the whole recipe."""
    return {"reading": "mixture", "mixture_stage": stage, **recipe.to_dict()}


def _config(recipe: LMRecipe, learning_rate: float, epochs: int, max_steps: int = 0, **extra: Any) -> dict[str, Any]:
    return {"loss_type": "sigmoid", "beta": recipe.beta, "learning_rate": learning_rate,
            "batch_size": recipe.batch_size, "epochs": epochs, "max_steps": max_steps,
            "checkpoint_every": recipe.checkpoint_every, "log_every": max(1, recipe.checkpoint_every // 2),
            "max_length": recipe.max_length, "seed": recipe.seed, **extra}


def recipe_request(
    recipe_name: Recipe, recipe: LMRecipe | MixtureRecipe, *, run_id: str, base_model: str, dataset: str,
    output_dir: Path | str,
) -> LMTrainingRequest:
    """The `proxyloop.train_lm` request of one recipe, in the recipe's reading. `base_model` is the stage-1
    checkpoint for two_stage and fine_tune, the base model otherwise; `dataset` the proxy pairs for stage1, the
    expert pairs (pooled: both) otherwise."""
    if isinstance(recipe, MixtureRecipe) and recipe_name not in MIXTURE_STAGES:  # full-model DPO: no mixture
        recipe = recipe.lm_recipe()
    if isinstance(recipe, MixtureRecipe):
        config = _mixture_config(recipe, MIXTURE_STAGES[recipe_name])
    elif recipe_name == "stage1":
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
    plan: Plan, recipe: LMRecipe | MixtureRecipe, *, run_id: str, base_model: str, stage1_checkpoint: str,
    expert_pairs: str, output_dir: Path | str,
) -> LMTrainingRequest | None:
    """What `plan` trains after stage 1, in the recipe's reading: None when the stage-1 model is the policy
    (proxy_as_is). A string outside `Plan` is a ValueError: 'stage1' and 'pooled' are recipes, not plans (the bench
    asks for them through `recipe_request`), and passed here they used to come back as requests the condition tests
    never chose."""
    if plan not in get_args(Plan):
        raise ValueError(f"unknown plan {plan!r}; known plans: {list(get_args(Plan))} "
                         "(recipe_request trains the recipes 'stage1' and 'pooled')")
    if plan == "refuse":
        raise ValueError("plan 'refuse' trains nothing; the run stops before training")
    if plan == "proxy_as_is":
        return None
    start = base_model if plan == "expert_only" else stage1_checkpoint
    return recipe_request(plan, recipe, run_id=run_id, base_model=start, dataset=expert_pairs, output_dir=output_dir)
