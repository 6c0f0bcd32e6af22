"""Preference and language-modelling objectives as pure functions of log-probabilities.

Paper 2 (arXiv 2410.11677) studies DPO (sigmoid), IPO and hinge/SLiC, each optionally with an NLL
term on the chosen response; the sequence log-probability is the sum of token log-probs for
DPO/IPO and their mean for hinge. Nothing here touches a model: callers pass token log-probs.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

LossType = Literal["sigmoid", "ipo", "hinge"]
LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo", "hinge")
Reduction = Literal["sum", "mean"]
# Paper 2's choice of sequence log-probability per loss (section 2 of ../shared/papers/README.md).
PAPER_REDUCTION: dict[str, Reduction] = {"sigmoid": "sum", "ipo": "sum", "hinge": "mean"}


def check_loss_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"Unknown loss type {loss_type!r}; should be one of {list(LOSS_TYPES)}")


def target_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """Log-probability of `targets` [...] under `logits` [..., V] -> [...].

    Computed as gather − logsumexp in float32 at least (bf16 logits are upcast), which avoids
    materialising a second [..., V] log-softmax tensor. The one formula of every log-prob path
    (`token_logps` and the chunked path of `chunked_logps.py`), so they cannot drift apart.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logps(logits: Tensor, input_ids: Tensor) -> Tensor:
    """Log-probability of each next token: logits [B, T, V], ids [B, T] -> [B, T-1] (position t scores id t+1)."""
    return target_logps(logits[:, :-1], input_ids[:, 1:])


def sequence_logps(per_token: Tensor, mask: Tensor, reduction: Reduction) -> Tensor:
    """Aggregate token log-probs [B, T] over `mask` [B, T] (1 = scored) into [B]: sum or mean."""
    assert per_token.shape == mask.shape, (per_token.shape, mask.shape)
    mask = mask.to(per_token.dtype)
    total = (per_token * mask).sum(dim=-1)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / mask.sum(dim=-1).clamp(min=1.0)
    raise ValueError(f"Unknown reduction {reduction!r}; should be one of ['sum', 'mean']")


def dpo_sigmoid_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """DPO (Rafailov et al. 2023, eq. 7): −log σ(β[(log π/π_ref)(y_w) − (log π/π_ref)(y_l)]), per pair."""
    return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))


def ipo_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """IPO (Azar et al. 2023, eq. 17): (Δ − 1/(2τ))² with τ = β, per pair."""
    return (chosen_logratios - rejected_logratios - 1.0 / (2.0 * beta)) ** 2


def hinge_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, margin: float = 1.0) -> Tensor:
    """Hinge / SLiC (Zhao et al. 2023, eq. 1) on reference log-ratios as TRL does: max(0, γ − βΔ), γ = 1."""
    return torch.relu(margin - beta * (chosen_logratios - rejected_logratios))


def nll_loss(chosen_token_logps: Tensor, chosen_mask: Tensor) -> Tensor:
    """Mean negative log-likelihood over every scored chosen token of the batch (TRL's `sft` term)."""
    return -chosen_token_logps[chosen_mask.bool()].mean()


def preference_loss(
    loss_type: str,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    reference_chosen: Tensor,
    reference_rejected: Tensor,
    beta: float,
) -> tuple[Tensor, dict[str, float]]:
    """Batch-mean loss and metrics from sequence log-probs [B] of the policy and the reference.

    One dispatch over the closed set `LOSS_TYPES`; metrics are keyed as in TRL (`rewards/margins`).
    """
    check_loss_type(loss_type)
    chosen_logratios = policy_chosen - reference_chosen
    rejected_logratios = policy_rejected - reference_rejected
    if loss_type == "sigmoid":
        per_pair = dpo_sigmoid_loss(chosen_logratios, rejected_logratios, beta)
    elif loss_type == "ipo":
        per_pair = ipo_loss(chosen_logratios, rejected_logratios, beta)
    else:
        per_pair = hinge_loss(chosen_logratios, rejected_logratios, beta)
    with torch.no_grad():
        chosen_rewards = beta * chosen_logratios
        rejected_rewards = beta * rejected_logratios
        metrics = {
            "rewards/chosen": float(chosen_rewards.mean()),
            "rewards/rejected": float(rejected_rewards.mean()),
            "rewards/margins": float((chosen_rewards - rejected_rewards).mean()),
            "rewards/accuracies": float((chosen_rewards > rejected_rewards).float().mean()),
            "logps/chosen": float(policy_chosen.mean()),
            "logps/rejected": float(policy_rejected.mean()),
        }
    return per_pair.mean(), metrics


def lm_loss(per_token: Tensor, loss_mask: Tensor) -> Tensor:
    """SFT loss: mean NLL over the tokens `loss_mask` [B, T-1] selects (IM or IT, see `sft.py`)."""
    mask = loss_mask.to(per_token.dtype)
    return -(per_token * mask).sum() / mask.sum().clamp(min=1.0)
