"""Stage 2 as a bag: adapters fitted on bootstrap resamples of the expert triples, averaged, and the average
distilled back into the one D×D adapter the released policy carries.

On a few dozen triples the adapter's centre (the identity or a relabelling, `fitting.choose_centre`) is a
discrete choice that a handful of triples can tip the wrong way. Refitting on bootstrap resamples lets each
resample make that choice, and averaging their answers hedges it (bagging). The average of two centres can
also express a map between them: a proxy whose outputs are a rotation of the expert's log-ratios, neither
the identity nor a relabelling, is answered better by the bag than by either centre (docs/appendix_d.md,
tuning seeds 0-17, ungated: +0.029 gold accuracy at 35 triples on `invertible`, within ±0.005 on the other
kinds).

The bag is then distilled into one adapter on unlabelled inputs (the proxy triples' x): the adapter family is
affine in log τ̃(x), so it cannot always hold the mixture, but started from the member closest to it the
distillation keeps most of the gain, and the released policy keeps paper 1's stack φ̃ ∘ Θ̃ ∘ π̄† ∘ τ̃ with a
single π̄† (same format, same serving). Starting from every member and keeping the closest matters: from the
single fit's centre alone the distillation can stay in the wrong basin (seed 7: 0.658 against the bag's 0.984).

The bag is a hedge on the centre, so it is used only when the resamples disagree about it (at least
MIN_DISSENT members choose another centre than the most common one); when they agree it only adds resampling
noise (tuning seeds: −0.040 to −0.014 accuracy on three such runs at 35 triples, small losses at 100), and the
single cross-validated fit is kept.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from policies.features.adapter_grid import centres_of, fit_members, member_log_probs
from policies.features.fit_recipe import FitRecipe
from policies.features.model import TwoStagePolicy
from policies.features.simplex_adapter import relabelled_centres

BAG_SIZE = 16  # bootstrap adapters; tuning seeds 0-17 of the Appendix D family (docs/appendix_d.md)
DISTIL_STEPS = 300  # full-batch Adam steps of the distillation, from each member at once
DISTIL_LR = 0.05  # the adapter stage's learning rate
DISTIL_INPUTS = 1000  # unlabelled inputs the bag is distilled on (a random subset when there are more)
MIN_DISSENT = 2  # members off the most common centre for the bag to be used (tuning seeds 0-11)


def fit_bag(stack: TwoStagePolicy, log_s: Tensor, y_w: Tensor, y_l: Tensor, seed: int, stage: FitRecipe,
            size: int = BAG_SIZE) -> tuple[Tensor, Tensor, list[int]]:
    """`size` adapters (M [size, D, D], b [size, D], and the index of each one's centre in `relabelled_centres`),
    member k fitted by `fit_adapter`'s recipe (its own centre, `stage`'s prior) on the k-th bootstrap resample of
    the triples (log_s = stack.log_embed(x)); in one batched fit."""
    n = log_s.shape[0]
    with torch.no_grad():
        gain, offset = stack.head_affine()
    candidates = relabelled_centres(gain, offset)
    generator = torch.Generator().manual_seed(seed)
    resamples = [torch.randint(0, n, (n,), generator=generator) for _ in range(size)]
    counts = torch.stack([torch.bincount(rows, minlength=n) for rows in resamples]).to(log_s)
    on_device = [rows.to(log_s.device) for rows in resamples]
    chosen, m0, b0 = centres_of(candidates, gain, offset, log_s, y_w, y_l, on_device)
    prior = torch.full((size,), stage.adapter_prior, dtype=log_s.dtype, device=log_s.device)
    weight, bias = fit_members(log_s, y_w, y_l, gain, offset, counts, m0, b0, prior, stage)
    return weight, bias, chosen


def centre_in_doubt(centres: list[int]) -> bool:
    """Do the bootstrap members disagree about the centre (at least MIN_DISSENT off the most common one)?"""
    return len(centres) - max(centres.count(c) for c in set(centres)) >= MIN_DISSENT


def average_log_probs(members: Tensor) -> Tensor:
    """log of the members' average answer: [K, N, outputs] log-probabilities -> [N, outputs]."""
    return torch.logsumexp(members, dim=0) - torch.log(torch.tensor(float(members.shape[0])))


def distil_bag(stack: TwoStagePolicy, weight: Tensor, bias: Tensor, log_s: Tensor) -> float:
    """Set the stack's adapter to the one closest (KL from the bag's average, over the inputs log_s) to the
    bag (weight [K, D, D], bias [K, D]), fitted from every member at once; returns that KL in nats per input."""
    with torch.no_grad():
        gain, offset = stack.head_affine()
        target = average_log_probs(member_log_probs(log_s, gain, offset, weight, bias))
        target_probs = target.exp()
    start_w, start_b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([start_w, start_b], lr=DISTIL_LR)

    def divergence() -> Tensor:  # [K]: KL(bag ‖ start k), mean over inputs
        return (target_probs * (target - member_log_probs(log_s, gain, offset, start_w, start_b))).sum(-1).mean(-1)

    for _ in range(DISTIL_STEPS):
        optimiser.zero_grad(set_to_none=True)
        divergence().sum().backward()
        optimiser.step()
    with torch.no_grad():
        final = divergence()
        best = int(final.argmin())
        stack.adapter.weight.copy_(start_w[best])
        stack.adapter.bias.copy_(start_b[best])
    return float(final[best])


def unlabelled_embedding(stack: TwoStagePolicy, x: Tensor, seed: int) -> Tensor:
    """log τ̃(x) of at most DISTIL_INPUTS of the inputs (a seeded random subset when there are more)."""
    if x.shape[0] > DISTIL_INPUTS:
        rows = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:DISTIL_INPUTS]
        x = x[rows.to(x.device)]
    with torch.no_grad():
        return stack.log_embed(x)


class Bag(nn.Module):
    """The bag itself as a preference model: the members' answers averaged (what `distil_bag` compresses). The
    condition tests score it in their cross-validation, where distilling every fold's bag would cost ~10× more."""

    def __init__(self, stack: TwoStagePolicy, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.stack, self.weight, self.bias = stack, weight, bias
        with torch.no_grad():
            self.gain, self.offset = stack.head_affine()

    def log_probs(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return average_log_probs(member_log_probs(self.stack.log_embed(x), self.gain, self.offset, self.weight,
                                                      self.bias))


def fit_bag_model(stack: TwoStagePolicy, x: Tensor, y_w: Tensor, y_l: Tensor, seed: int, stage: FitRecipe,
                  size: int = BAG_SIZE) -> Bag | None:
    """`fit_bag` on these triples as a model of its own (the stack is shared, not changed), or None when its
    members agree about the centre and the worker would keep its single fit."""
    with torch.no_grad():
        log_s = stack.log_embed(x)
    weight, bias, centres = fit_bag(stack, log_s, y_w, y_l, seed, stage, size)
    return Bag(stack, weight, bias) if centre_in_doubt(centres) else None


def bag_and_distil(stack: TwoStagePolicy, x: Tensor, y_w: Tensor, y_l: Tensor, unlabelled: Tensor, seed: int,
                   stage: FitRecipe, size: int = BAG_SIZE) -> float | None:
    """Stage 2's bag on the expert triples (x, y_w, y_l), distilled into the stack's adapter on `unlabelled`
    inputs when its members disagree about the centre (`centre_in_doubt`); only the adapter changes. Returns the
    distilled adapter's KL from the bag (nats per input), or None when the members agreed and nothing changed."""
    bag = fit_bag_model(stack, x, y_w, y_l, seed, stage, size)
    if bag is None:
        return None
    return distil_bag(stack, bag.weight, bag.bias, unlabelled_embedding(stack, unlabelled, seed))
