"""Fitting recipes for the feature policies: full-batch Adam on the Bradley–Terry loss, stage 1 on
proxy triples, the adapter's centre and prior chosen on expert triples (stage 2).

Kept apart from the model so serving and loading import the model without the training code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from policies.condition_statistics import grouped_folds, input_groups
from policies.features.adapter_grid import best_centre, held_out_by_prior
from policies.features.fit_recipe import ADAPTER_PRIORS, ADAPTER_STAGE, PROXY_STAGE, FitRecipe
from policies.features.model import (
    PreferenceModel,
    TwoStagePolicy,
    preference_loss,
    scale_inputs_once,
)
from policies.features.simplex_adapter import relabelled_centres


def fit_preferences(
    model: PreferenceModel,
    parameters: Iterator[nn.Parameter] | Sequence[nn.Parameter],
    x: Tensor,
    y_w: Tensor,
    y_l: Tensor,
    steps: int,
    lr: float,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
    *,
    weight_decay: float = 0.0,
    anchor: float = 0.0,
    penalty: Callable[[], Tensor] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> float:
    """Full-batch Adam on the Bradley–Terry loss over `parameters`; returns the final loss.

    Only `parameters` move (pass `model.adapter_parameters()` for stage 2). The seed fixes torch's
    RNG inside the fit without disturbing the caller's, so equal inputs give equal results.
    `on_step(step, loss)` sees the loss before each update.

    `weight_decay` is Adam's L2 toward zero. `anchor` adds anchor·Σ‖p − p₀‖² toward the values the
    parameters had when the fit started: for the adapter that is the identity map, which keeps a
    fit on a few dozen separable triples from diverging to overconfident predictions. `penalty()`
    is any further term added to the objective (e.g. a weighted `SimplexAdapter.deviation`).
    `after_step(k)` runs after the k-th update (k = 1..steps): where a caller saves checkpoints.
    """
    params = [p for p in parameters if p.requires_grad]
    if not params:
        raise ValueError("fit_preferences got no trainable parameters; check set_stage()/requires_grad")
    if steps < 1 or lr <= 0:
        raise ValueError(f"fit_preferences needs steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
    if x.shape[0] == 0:
        raise ValueError("fit_preferences needs at least one triple, got an empty batch")
    if weight_decay < 0 or anchor < 0:
        raise ValueError(f"weight_decay and anchor must be >= 0, got {weight_decay} and {anchor}")
    scale_inputs_once(model, x)
    start = [p.detach().clone() for p in params] if anchor > 0 else []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        optimiser = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        model.train()
        for step in range(steps):
            optimiser.zero_grad(set_to_none=True)
            loss = preference_loss(model.log_probs(x), y_w, y_l)
            objective = loss
            if start:
                objective = loss + anchor * sum(((p - p0) ** 2).sum() for p, p0 in zip(params, start, strict=True))
            if penalty is not None:
                objective = objective + penalty()
            objective.backward()
            if on_step is not None:
                on_step(step, float(loss.detach()))
            optimiser.step()
            if after_step is not None:
                after_step(step + 1)
        model.eval()
        with torch.no_grad():
            return float(preference_loss(model.log_probs(x), y_w, y_l))


class _OnEmbedding(nn.Module):
    """A stack's adapter and head on precomputed log τ̃(x): stage 2 without re-running the frozen τ̃."""

    def __init__(self, stack: TwoStagePolicy) -> None:
        super().__init__()
        self.stack = stack

    def log_probs(self, log_s: Tensor) -> Tensor:
        return F.log_softmax(self.stack.head(self.stack.adapter(log_s)), dim=-1)


def fit_stage1(
    stack: TwoStagePolicy, x: Tensor, y_w: Tensor, y_l: Tensor, seed: int, recipe: FitRecipe = PROXY_STAGE,
    on_step: Callable[[int, float], None] | None = None, after_step: Callable[[int], None] | None = None,
) -> float:
    """Stage 1 in place: τ̃, Θ̃, φ̃ on proxy triples, the adapter held at the identity."""
    stack.adapter.reset(identity=True)
    stack.set_stage(1)
    return fit_preferences(stack, stack.proxy_parameters(), x, y_w, y_l, recipe.steps, recipe.lr, seed, on_step,
                           weight_decay=recipe.weight_decay, after_step=after_step)


def choose_centre(stack: TwoStagePolicy, log_s: Tensor, y_w: Tensor, y_l: Tensor) -> int:
    """Set the adapter's centre to the relabelling of the frozen head's outputs (identity included)
    that best explains these expert triples, and start the adapter there; returns its index in
    `relabelled_centres` (0: identity).

    log_s = stack.log_embed(x). A relabelling must beat the identity by log(K − 1) nats, K the number
    of candidates: a prior with half its mass on keeping the proxy's labels and the rest spread over
    the relabellings, so a handful of triples does not relabel a proxy that is merely noisy.
    """
    gain, offset = stack.head_affine()
    candidates = relabelled_centres(gain, offset)
    best = best_centre(candidates, gain, offset, log_s, y_w, y_l)
    stack.adapter.set_centre(*candidates[best])
    stack.adapter.reset()
    return best


def fit_adapter(
    stack: TwoStagePolicy, x: Tensor, y_w: Tensor, y_l: Tensor, seed: int, recipe: FitRecipe = ADAPTER_STAGE,
    on_step: Callable[[int, float], None] | None = None, after_step: Callable[[int], None] | None = None,
) -> float:
    """Stage 2 in place: only the adapter, from the centre `choose_centre` picks, on expert
    triples; the rest frozen."""
    stack.set_stage(2)
    with torch.no_grad():
        log_s = stack.log_embed(x)  # τ̃ is frozen: embed once, not once per step
    choose_centre(stack, log_s, y_w, y_l)
    n = x.shape[0]
    has_prior = recipe.adapter_prior > 0 or recipe.tempering_prior > 0
    penalty = (lambda: recipe.adapter_penalty(stack.adapter, n)) if has_prior else None
    return fit_preferences(_OnEmbedding(stack), stack.adapter_parameters(), log_s, y_w, y_l, recipe.steps,
                           recipe.lr, seed, on_step, weight_decay=recipe.weight_decay, penalty=penalty,
                           after_step=after_step)


def choose_adapter_prior(
    stack: TwoStagePolicy, x: Tensor, y_w: Tensor, y_l: Tensor, seed: int, folds: int = 5,
    priors: Sequence[float] = ADAPTER_PRIORS, recipe: FitRecipe = ADAPTER_STAGE,
) -> float:
    """The adapter prior chosen by `folds`-fold cross-validated log-likelihood on these expert
    triples alone (no other data is looked at); the stack is left as it was. Every (prior, fold) fit
    runs at once (`adapter_grid.held_out_by_prior`): the same fits as `fit_adapter` on each split.

    One-standard-error rule: the strongest prior whose held-out log-likelihood is within one
    standard error (of its paired difference per triple) of the best. On a few dozen triples the
    best CV score is mostly noise, and the weaker priors it picks let the adapter wander from a
    centre that is usually right (Appendix D: 35 triples, see docs/appendix_d.md).
    """
    n = x.shape[0]
    groups = input_groups(x.cpu().numpy())  # copies of one input stay in one fold (grouped_folds says why)
    order = torch.randperm(int(groups.max(initial=-1)) + 1, generator=torch.Generator().manual_seed(seed)).numpy()
    parts = [torch.from_numpy(p) for p in grouped_folds(order, groups, folds) if len(p)]
    if len(parts) < 2:  # one distinct input (however many copies): nothing to hold out, so the strongest prior
        return float(max(priors))
    held_out = held_out_by_prior(stack, x, y_w, y_l, parts, priors, recipe)
    means = held_out.mean(axis=1)
    best = int(np.argmax(means))
    standard_errors = (held_out[best] - held_out).std(axis=1, ddof=1) / np.sqrt(n) if n > 1 else np.zeros(len(priors))
    eligible = [i for i in range(len(priors)) if means[i] >= means[best] - standard_errors[i]]
    return float(max(priors[i] for i in eligible))
