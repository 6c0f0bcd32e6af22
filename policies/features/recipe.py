"""The feature two-stage recipe, once: what bench/appendix_d.py reports and the training worker trains.

Stage 1 fits τ̃, Θ̃, φ̃ on proxy triples; stage 2 fits only the adapter on expert triples, its prior
chosen by cross-validation on those triples alone (`choose_adapter_prior`, one-standard-error rule); when a
bootstrap bag of adapters disagrees about the centre, the bag distilled into one on the proxy triples' inputs
(policies/features/bagged_adapter.py).
Chosen on the tuning seeds 0–49 of the Appendix D family (docs/appendix_d.md); a training request
that names no step counts or adapter size gets exactly this recipe (`resolve_recipe`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ground.schemas import TrainingRequest
from policies.features.bagged_adapter import BAG_SIZE, bag_and_distil
from policies.features.fit_recipe import ADAPTER_PRIORS, ADAPTER_STAGE, PROXY_STAGE, FitRecipe
from policies.features.fitting import choose_adapter_prior, fit_adapter
from policies.features.model import TwoStageConfig, TwoStagePolicy, preference_loss


@dataclass(frozen=True)
class TwoStageRecipe:
    """Everything that decides a two-stage fit besides the data and the seed."""

    proxy_stage: FitRecipe  # stage 1: steps, lr, weight decay on proxy triples
    adapter_stage: FitRecipe  # stage 2: steps, lr; its adapter_prior is replaced by the CV choice
    adapter_priors: tuple[float, ...]  # the grid `choose_adapter_prior` picks from
    prior_folds: int  # folds of that cross-validation
    simplex_dim: int  # D: the adapter is D×D + D
    hidden: int  # width of τ̃'s hidden layer
    bag_size: int = BAG_SIZE  # bootstrap adapters distilled into the one served (policies/features/bagged_adapter.py)

    def config(self, input_dim: int, n_outputs: int) -> TwoStageConfig:
        return TwoStageConfig(input_dim=input_dim, n_outputs=n_outputs, simplex_dim=self.simplex_dim,
                              hidden=self.hidden)


# 8000 proxy triples in Appendix D: 600 full-batch steps (400 left stage 1 short of fitting them).
TWO_STAGE = TwoStageRecipe(
    proxy_stage=replace(PROXY_STAGE, steps=600), adapter_stage=ADAPTER_STAGE, adapter_priors=ADAPTER_PRIORS,
    prior_folds=5, simplex_dim=3, hidden=32,
)


def resolve_recipe(request: TrainingRequest, recipe: TwoStageRecipe = TWO_STAGE) -> TwoStageRecipe:
    """The recipe a training request runs: `recipe`, with the request's step counts and adapter size
    where it names them (tests and smoke runs shorten them; a plain request changes nothing)."""
    out = recipe
    if request.stage1_epochs is not None:
        out = replace(out, proxy_stage=replace(out.proxy_stage, steps=request.stage1_epochs))
    if request.stage2_epochs is not None:
        out = replace(out, adapter_stage=replace(out.adapter_stage, steps=request.stage2_epochs))
    if request.adapter_dim is not None:
        out = replace(out, simplex_dim=request.adapter_dim)
    return out


def fit_two_stage_adapter(
    stack: TwoStagePolicy, x: Tensor, y_w: Tensor, y_l: Tensor, seed: int, recipe: TwoStageRecipe = TWO_STAGE,
    on_step: Callable[[int, float], None] | None = None, after_step: Callable[[int], None] | None = None,
    unlabelled: Tensor | None = None,
) -> float:
    """Stage 2 in place: the adapter fitted at the prior `cross_validated_adapter_stage` picks. With `unlabelled`
    inputs (the proxy triples' x) and a bag of at least 2, that fit is then replaced by the bootstrap bag of
    adapters distilled on them when the bag's members disagree about the centre (`bag_and_distil`); `after_step`
    sees the last step only once the adapter is final.
    Returns the final loss on the expert triples."""
    stage = cross_validated_adapter_stage(stack, x, y_w, y_l, seed, recipe)
    if unlabelled is None or recipe.bag_size < 2 or x.shape[0] < 2:
        return fit_adapter(stack, x, y_w, y_l, seed, stage, on_step, after_step)
    before_last = None if after_step is None else (lambda step: after_step(step) if step < stage.steps else None)
    fit_adapter(stack, x, y_w, y_l, seed, stage, on_step, before_last)
    bag_and_distil(stack, x, y_w, y_l, unlabelled, seed, stage, recipe.bag_size)
    if after_step is not None:
        after_step(stage.steps)
    with torch.no_grad():
        return float(preference_loss(stack.log_probs(x), y_w, y_l))


def cross_validated_adapter_stage(
    stack: TwoStagePolicy, x: Tensor, y_w: Tensor, y_l: Tensor, seed: int, recipe: TwoStageRecipe = TWO_STAGE,
) -> FitRecipe:
    """Stage 2's fit with its adapter prior chosen by cross-validation on these expert triples (with a single
    triple there is nothing to cross-validate: the stage's own prior); the stack is left as it was."""
    if x.shape[0] < 2:
        return recipe.adapter_stage
    prior = choose_adapter_prior(stack, x, y_w, y_l, seed, recipe.prior_folds, recipe.adapter_priors,
                                 recipe.adapter_stage)
    return replace(recipe.adapter_stage, adapter_prior=prior)
