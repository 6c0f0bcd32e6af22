"""The learners the condition tests compare, fitted on expert triples and cross-validated.

Each candidate plan's learner (two-stage: the worker's bootstrap bag of adapters, scored as the bag rather
than distilled; fine-tune, expert-only; the proxy as is needs no fit) plus the level-set test's augmented
model, with the same fit recipes the training worker uses (policies.features.fitting,
policies.features.recipe): small full-batch fits, well under a second each on one core. The adapter's prior
is the worker's: chosen once by `choose_adapter_prior` on all the expert triples, then used in every fold (so
the held-out scores describe the adapter users get; nested cross-validation would cost 6× those 30 fits again
for one hyperparameter picked from six).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from policies.condition_statistics import seeded_grouped_folds
from policies.features.bagged_adapter import fit_bag_model
from policies.features.fit_recipe import EXPERT_ONLY, FINE_TUNE, FINE_TUNE_PRIOR, FitRecipe
from policies.features.fitting import choose_centre, fit_adapter, fit_preferences
from policies.features.model import (
    DirectPolicy,
    PreferenceModel,
    TwoStageConfig,
    TwoStagePolicy,
    preference_log_likelihoods,
)
from policies.features.recipe import TWO_STAGE, TwoStageRecipe, cross_validated_adapter_stage
from policies.plan_choice import CANDIDATES

CV_FOLDS = 6  # cross-validation folds over expert triples: 60 triples -> 10 held out per fold
# Every learner cross_validate can score: CANDIDATES and the level-set test's adapter plus a direct path from x.
LEARNERS: tuple[str, ...] = (*CANDIDATES, "augmented")
_FOLD_FITS = ("two_stage", "augmented", "fine_tune", "expert_only")  # the order each fold fits them in
DIRECT_HIDDEN = 32
# The direct x path of the level-set test is pulled to zero with a prior worth this many triples.
DIRECT_PATH_PRIOR = 1.0


class _AdapterPlusInputs(nn.Module):
    """The frozen proxy stack with its adapter plus a direct linear path from x to the logits.

    It nests the adapter-only model, so a held-out gain over it means x carries information about
    the expert's choice that the proxy's output does not: the expert does not factor through π.
    """

    def __init__(self, base: TwoStagePolicy) -> None:
        super().__init__()
        self.base = base
        self.direct = nn.Linear(base.config.input_dim, base.config.n_outputs)
        nn.init.zeros_(self.direct.weight)
        nn.init.zeros_(self.direct.bias)

    def log_probs(self, x: Tensor) -> Tensor:
        return F.log_softmax(self.base.logits(x) + self.direct(self.base.inputs(x)), dim=-1)


@dataclass
class CrossValidated:
    """Held-out per-triple log-likelihoods of every expert-side learner, and their correctness."""

    ll: dict[str, np.ndarray]  # the learners asked for, of LEARNERS: CANDIDATES and "augmented" (adapter + direct path)
    correct: dict[str, np.ndarray]
    adapter_prior: float  # the adapter prior every fold used (the worker's choice on all the triples)


def _fresh_adapter(stack: TwoStagePolicy) -> TwoStagePolicy:
    model = copy.deepcopy(stack)
    model.adapter.reset()
    model.set_stage(2)
    return model


def fit_direct(config: TwoStageConfig, x: Tensor, y_w: Tensor, y_l: Tensor, seed: int) -> DirectPolicy:
    """The expert-only learner: a DirectPolicy fitted on expert triples alone."""
    torch.manual_seed(seed)
    model = DirectPolicy(config.input_dim, config.n_outputs, DIRECT_HIDDEN)
    fit_preferences(
        model, model.parameters(), x, y_w, y_l, EXPERT_ONLY.steps, EXPERT_ONLY.lr, seed,
        weight_decay=EXPERT_ONLY.weight_decay,
    )
    return model


def _fit_augmented(stack: TwoStagePolicy, x: Tensor, y_w: Tensor, y_l: Tensor, seed: int,
                   stage: FitRecipe) -> _AdapterPlusInputs:
    """Adapter plus direct x path, with the adapter's own prior (`stage`) and a ridge on the x path."""
    base = _fresh_adapter(stack)
    with torch.no_grad():
        choose_centre(base, base.log_embed(x), y_w, y_l)  # the null's centre, so the model nests it
    model = _AdapterPlusInputs(base)
    adapter, n = model.base.adapter, x.shape[0]

    def penalty() -> Tensor:
        ridge = sum((p**2).sum() for p in model.direct.parameters())
        return stage.adapter_penalty(adapter, n) + DIRECT_PATH_PRIOR * ridge / n

    params = [*model.base.adapter_parameters(), *model.direct.parameters()]
    fit_preferences(model, params, x, y_w, y_l, stage.steps, stage.lr, seed, penalty=penalty)
    return model


def _fit_fine_tune(stack: TwoStagePolicy, x: Tensor, y_w: Tensor, y_l: Tensor, seed: int) -> TwoStagePolicy:
    """Every weight of the stack, from its stage-1 values and pulled back toward them."""
    model = copy.deepcopy(stack)
    for p in model.parameters():
        p.requires_grad_(True)
    fit_preferences(model, list(model.parameters()), x, y_w, y_l, FINE_TUNE.steps, FINE_TUNE.lr, seed,
                    anchor=FINE_TUNE_PRIOR / x.shape[0])
    return model


def held_out(model: PreferenceModel, x: Tensor, y_w: Tensor, y_l: Tensor) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        ll = preference_log_likelihoods(model.log_probs(x), y_w, y_l)
    return ll.numpy().astype(np.float64), (ll > np.log(0.5)).numpy().astype(np.float64)


def _fit_learner(name: str, stack: TwoStagePolicy, x: Tensor, y_w: Tensor, y_l: Tensor, seed: int,
                 stage: FitRecipe, recipe: TwoStageRecipe) -> PreferenceModel:
    """One fold's fit of a learner of _FOLD_FITS (the proxy as is fits nothing)."""
    if name == "two_stage":
        # The worker's two_stage: its bag (before distillation) when the bag's members disagree about the centre,
        # else the single fit.
        bag = fit_bag_model(stack, x, y_w, y_l, seed, stage, recipe.bag_size) if recipe.bag_size >= 2 else None
        if bag is not None:
            return bag
        adapter = _fresh_adapter(stack)
        fit_adapter(adapter, x, y_w, y_l, seed, stage)
        return adapter
    if name == "augmented":
        return _fit_augmented(stack, x, y_w, y_l, seed, stage)
    if name == "fine_tune":
        return _fit_fine_tune(stack, x, y_w, y_l, seed)
    return fit_direct(stack.config, x, y_w, y_l, seed)


def cross_validate(stack: TwoStagePolicy, x: Tensor, y_w: Tensor, y_l: Tensor, seed: int,
                   recipe: TwoStageRecipe = TWO_STAGE, learners: Sequence[str] = LEARNERS) -> CrossValidated:
    """Held-out scores of `learners` (every one of LEARNERS by default; SMALL_SAMPLE below the minimum expert sample,
    where the others' fits would be wasted). The folds and each learner's fits are the same whichever are asked."""
    unknown = [name for name in learners if name not in LEARNERS]
    if unknown:
        raise ValueError(f"unknown learners {unknown}; known: {list(LEARNERS)}")
    n = x.shape[0]
    stage = cross_validated_adapter_stage(stack, x, y_w, y_l, seed, recipe)
    folds = seeded_grouped_folds(x.cpu().numpy(), seed, CV_FOLDS)  # copies of one input stay in one fold
    ll = {k: np.zeros(n) for k in learners}
    correct = {k: np.zeros(n) for k in learners}
    if "proxy_as_is" in learners:  # it sees no expert data, so every triple is already held out for it
        ll["proxy_as_is"], correct["proxy_as_is"] = held_out(stack, x, y_w, y_l)
    fitted_in_folds = [name for name in _FOLD_FITS if name in learners]
    for fold, test_idx in enumerate(folds):
        train = torch.from_numpy(np.setdiff1d(np.arange(n), test_idx))
        test = torch.from_numpy(test_idx)
        xt, wt, lt = x[train], y_w[train], y_l[train]
        fitted = {name: _fit_learner(name, stack, xt, wt, lt, seed + fold, stage, recipe) for name in fitted_in_folds}
        for name, model in fitted.items():
            ll[name][test_idx], correct[name][test_idx] = held_out(model, x[test], y_w[test], y_l[test])
    return CrossValidated(ll, correct, stage.adapter_prior)
