"""Many stage-2 adapter fits at once: one per (prior, fold) of the prior's cross-validation.

`choose_adapter_prior` fits the adapter 30 times (6 priors × 5 folds) on a few dozen triples; one at a
time, each fit is 300 Adam steps whose cost is Python overhead, not arithmetic (~0.2 s each). The fits
are independent and Adam's update is elementwise, so stacking them along a batch dimension and
minimising the sum of their objectives runs the same 30 trajectories in one loop (parity with
separate `fit_adapter` calls in tests/policies/test_adapter_grid.py). Through the frozen head the logits
are affine in (M, b) (the head centres log u, so the softmax's normaliser drops out), which is what
makes the batch one einsum.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from policies.features.fit_recipe import FitRecipe
from policies.features.model import TwoStagePolicy, preference_log_likelihoods
from policies.features.simplex_adapter import deviation_terms, relabelled_centres


def best_centre(candidates: Sequence[tuple[Tensor, Tensor]], gain: Tensor, offset: Tensor, log_s: Tensor,
                y_w: Tensor, y_l: Tensor) -> int:
    """Index of the relabelling (0: the identity) these triples favour, a relabelling having to beat the
    identity by log(K − 1) nats (K candidates): half the prior's mass on keeping the proxy's labels."""
    with torch.no_grad():
        logits = [(log_s @ m.T + b) @ gain.T + offset for m, b in candidates]
        scores = [float(preference_log_likelihoods(F.log_softmax(z, dim=-1), y_w, y_l).sum()) for z in logits]
    cost = float(np.log(max(len(candidates) - 1, 1)))
    return max(range(len(candidates)), key=lambda k: scores[k] - (cost if k else 0.0))


def centres_of(candidates: Sequence[tuple[Tensor, Tensor]], gain: Tensor, offset: Tensor, log_s: Tensor, y_w: Tensor,
               y_l: Tensor, subsets: Sequence[Tensor]) -> tuple[list[int], Tensor, Tensor]:
    """The centre `best_centre` picks on each subset of the triples (row indices or a mask): (their indices in
    `candidates`, M₀ [subsets, D, D], b₀ [subsets, D]), the starting points of a batched `fit_members`."""
    chosen = [best_centre(candidates, gain, offset, log_s[rows], y_w[rows], y_l[rows]) for rows in subsets]
    return chosen, torch.stack([candidates[c][0] for c in chosen]), torch.stack([candidates[c][1] for c in chosen])


def held_out_by_prior(stack: TwoStagePolicy, x: Tensor, y_w: Tensor, y_l: Tensor, parts: Sequence[Tensor],
                      priors: Sequence[float], recipe: FitRecipe) -> np.ndarray:
    """Held-out log-likelihood [len(priors), n] of the adapter fitted on all parts but one, for each
    prior (in place of `recipe.adapter_prior`), scored on the part left out: what `fit_adapter` (centre
    search, then Adam on the loss plus the prior) on each training split gives, for every split and prior
    in one batched fit."""
    n, n_folds = x.shape[0], len(parts)
    with torch.no_grad():
        log_s = stack.log_embed(x)
        gain, offset = stack.head_affine()
    candidates = relabelled_centres(gain, offset)
    train_mask = torch.ones(n_folds, n, device=log_s.device)  # on the stack's device, as fit_members needs
    for k, test in enumerate(parts):
        train_mask[k, test] = 0.0
    _, m0, b0 = centres_of(candidates, gain, offset, log_s, y_w, y_l, [mask.bool() for mask in train_mask])
    # Member (i, k): prior i, fold k, at index i * n_folds + k.
    m0 = m0.repeat(len(priors), 1, 1)
    b0 = b0.repeat(len(priors), 1)
    prior = torch.tensor(priors, dtype=train_mask.dtype, device=log_s.device).repeat_interleave(n_folds)
    weight, bias = fit_members(log_s, y_w, y_l, gain, offset, train_mask.repeat(len(priors), 1), m0, b0, prior, recipe)
    with torch.no_grad():
        ll = member_log_likelihoods(log_s, y_w, y_l, gain, offset, weight, bias).reshape(len(priors), n_folds, n)
    held_out = np.zeros((len(priors), n))
    for k, test in enumerate(parts):
        held_out[:, test.numpy()] = ll[:, k, test.to(ll.device)].cpu().numpy()
    return held_out


def member_log_probs(log_s: Tensor, gain: Tensor, offset: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """[members, n, outputs] log-probabilities of each adapter (M [members, D, D], b [members, D]) through the frozen
    head (logits = gain·u + offset)."""
    u = torch.einsum("nd,med->mne", log_s, weight) + bias[:, None, :]
    return F.log_softmax(u @ gain.T + offset, dim=-1)


def member_log_likelihoods(log_s: Tensor, y_w: Tensor, y_l: Tensor, gain: Tensor, offset: Tensor, weight: Tensor,
                           bias: Tensor) -> Tensor:
    """Per-triple Bradley–Terry log-likelihood [members, n] of each adapter (`member_log_probs`)."""
    log_probs = member_log_probs(log_s, gain, offset, weight, bias)
    rows = torch.arange(log_s.shape[0], device=log_s.device)
    return F.logsigmoid(log_probs[:, rows, y_w] - log_probs[:, rows, y_l])


def fit_members(log_s: Tensor, y_w: Tensor, y_l: Tensor, gain: Tensor, offset: Tensor, row_weights: Tensor,
                m0: Tensor, b0: Tensor, prior: Tensor, recipe: FitRecipe) -> tuple[Tensor, Tensor]:
    """Adapters fitted at once, member m on the triples weighted by row_weights[m] (a 0/1 mask: a training split;
    counts: a bootstrap resample), from and pulled toward its centre (m0[m], b0[m]) with prior[m]: what
    `fit_adapter` gives on those triples with that centre and prior. Returns the fitted (M, b), detached."""
    n_train = row_weights.sum(dim=1)
    weight = m0.clone().requires_grad_(True)
    bias = b0.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([weight, bias], lr=recipe.lr, weight_decay=recipe.weight_decay)
    for _ in range(recipe.steps):
        optimiser.zero_grad(set_to_none=True)
        ll = member_log_likelihoods(log_s, y_w, y_l, gain, offset, weight, bias)
        loss = -(ll * row_weights).sum(dim=1) / n_train
        shape, tempering = deviation_terms(weight, bias, m0, b0)
        (loss + recipe.prior_per_triple(shape, tempering, n_train, prior)).sum().backward()
        optimiser.step()
    return weight.detach(), bias.detach()
