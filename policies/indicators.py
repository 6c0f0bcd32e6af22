"""Paper 2's over-optimisation indicators: top-k entropy and top-k probability mass.

Both are computed for every position of a logits tensor at once; the release gate watches them on
held-out prompts, since a falling entropy or a shrinking mass flags over-optimisation that a
rising chosen-likelihood hides.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

DEFAULT_TOP_K = 10  # paper 2 uses k = 10 for both indicators


def topk_indicators(logits: Tensor, k: int = DEFAULT_TOP_K, renormalise: bool = True) -> tuple[Tensor, Tensor]:
    """Per-position top-k entropy (bits) and top-k probability mass of `logits` [..., V].

    Returns two tensors of shape [...]:
    - entropy H = −Σ_{i≤k} p_i log₂ p_i over the k most likely outputs. Paper 2 leaves open whether
      p is renormalised over the top-k; our documented default (`renormalise=True`) renormalises,
      so H lies in [0, log₂ k] and measures the spread among the candidates alone.
      `renormalise=False` uses the raw softmax probabilities.
    - mass Σ_{i≤k} p_i, always from the raw softmax (renormalised it would be 1).

    k is clamped to V. Computed in float32 at least, whatever the logits' dtype. Where softmax is undefined
    (a row of all -inf, a +inf or a NaN logit) both are NaN: the entropy would otherwise read 0 bits, "fully
    confident", and the gate would take that for a collapse instead of ignoring the reading.
    """
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have a non-empty last (vocabulary) axis, got shape {tuple(logits.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    work_dtype = torch.promote_types(logits.dtype, torch.float32)
    log_p = F.log_softmax(logits.to(work_dtype), dim=-1)
    undefined = log_p.isnan().any(dim=-1)  # log_softmax turns any such row into NaN throughout
    top_log_p = log_p.topk(min(k, log_p.shape[-1]), dim=-1).values  # [..., k]
    mass = top_log_p.exp().sum(dim=-1)
    if renormalise:
        top_log_p = top_log_p - torch.logsumexp(top_log_p, dim=-1, keepdim=True)
    # xlogy-style product: exp(-inf) * -inf would be nan, so zero-probability entries give 0.
    p = top_log_p.exp()
    entropy_nats = -torch.where(p > 0, p * top_log_p, torch.zeros_like(p)).sum(dim=-1)
    entropy_bits = entropy_nats / math.log(2.0) + 0.0  # + 0.0: a certain output reads 0.0 bits, not -0.0
    nan = torch.full_like(mass, math.nan)
    return torch.where(undefined, nan, entropy_bits), torch.where(undefined, nan, mass)


def summarise(values: Tensor) -> dict[str, float]:
    """Mean and (population) standard deviation of an indicator over all positions."""
    if values.numel() == 0:
        raise ValueError("summarise needs at least one value, got an empty tensor")
    flat = values.detach().to(torch.float64).flatten()
    return {"mean": float(flat.mean()), "std": float(flat.std(correction=0))}
