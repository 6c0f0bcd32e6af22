"""The loop's objectives (DPO-family pairs, SFT chats), with losses that add up exactly across ranks.

A global micro-batch's loss is a mean: over its pairs (the preference term), over its scored tokens
(the NLL term, SFT). Split across ranks, a rank's own mean weighs its shard as much as any other,
which is the global mean only when shards hold equal counts; a last batch of 5 pairs on 2 ranks does
not. So each rank's loss is its shard's *share* of the global mean, mean × (shard count ÷ global
count), with the global counts (`totals`) computed from the global batch's indices, which every rank
holds: no communication. The ranks' losses then sum to the one-process loss, and so do their
gradients; the loop multiplies by the world size because DDP averages gradients. Metrics are shares
too (or plain counts), so their sum over ranks is what one process reports.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from workers.lm.training.data import TokenizedChat, TokenizedPair, collate_chats, collate_pairs
from workers.lm.training.dpo import completion_token_logps
from workers.lm.training.dpo_config import DPOConfig
from workers.lm.training.objectives import preference_loss, sequence_logps
from workers.lm.training.sft import sft_batch_loss
from workers.lm.training.sft_config import SFTConfig


class PairObjective:
    """DPO / IPO / hinge (+ NLL) against reference log-probs computed once for the whole dataset."""

    def __init__(self, pairs: list[TokenizedPair], reference: tuple[Tensor, Tensor], config: DPOConfig,
                 pad: int) -> None:
        self.pairs, self.reference, self.config, self.pad = pairs, reference, config, pad
        self.lengths = [p.length for p in pairs]

    def batch(self, indices: list[int]) -> dict[str, Tensor]:
        batch = collate_pairs([self.pairs[i] for i in indices], self.pad, self.config.max_length)
        batch["reference_chosen"] = self.reference[0][indices]
        batch["reference_rejected"] = self.reference[1][indices]
        return batch

    def totals(self, indices: list[int]) -> tuple[float, ...]:
        """(pairs, scored chosen tokens) of the global micro-batch: the denominators of its two means."""
        mask = collate_pairs([self.pairs[i] for i in indices], self.pad, self.config.max_length)["completion_mask"]
        return float(len(indices)), float(mask[:len(indices), 1:].sum())

    def loss(self, model: Any, batch: dict[str, Tensor], totals: tuple[float, ...]) -> tuple[Tensor, dict[str, float]]:
        """This shard's share of `dpo_batch_loss` over the global micro-batch (equal to it on one rank)."""
        config = self.config
        per_token, mask = completion_token_logps(model, batch, config.logps_chunk_tokens, config.share_prompts)
        chosen, rejected = sequence_logps(per_token, mask, config.reduction).chunk(2, dim=0)
        mean, metrics = preference_loss(config.loss_type, chosen, rejected, batch["reference_chosen"],
                                        batch["reference_rejected"], config.beta)
        share = chosen.shape[0] / totals[0]
        loss = mean * share
        metrics = {key: value * share for key, value in metrics.items()}
        if config.nll_weight:
            chosen_tokens, _ = per_token.chunk(2, dim=0)
            chosen_mask, _ = mask.chunk(2, dim=0)
            nll = -(chosen_tokens * chosen_mask.to(chosen_tokens.dtype)).sum() / max(totals[1], 1.0)
            metrics["nll/chosen"] = float(nll.detach())
            loss = loss + config.nll_weight * nll
        return loss, metrics


class ChatObjective:
    """SFT: mean NLL over the scored tokens (IM or IT mask, see `sft.py`).

    `max_length` is the run's cap, `sequence_cap(model, config.max_length)`, not the recipe's alone: past its
    context a model with a position table fails (GPT-2) and one with rotary positions reads positions it never
    trained on."""

    def __init__(self, chats: list[TokenizedChat], config: SFTConfig, pad: int, max_length: int) -> None:
        self.chats, self.config, self.pad, self.max_length = chats, config, pad, max_length
        self.lengths = [min(c.length, max_length) for c in chats]

    def batch(self, indices: list[int]) -> dict[str, Tensor]:
        return collate_chats([self.chats[i] for i in indices], self.pad, self.max_length)

    def totals(self, indices: list[int]) -> tuple[float, ...]:
        """(scored tokens,) of the global micro-batch: the denominator of its mean."""
        return (float(self.batch(indices)["loss_mask"][:, 1:].sum()),)

    def loss(self, model: Any, batch: dict[str, Tensor], totals: tuple[float, ...]) -> tuple[Tensor, dict[str, float]]:
        loss, metrics = sft_batch_loss(model, batch)  # a sum, "tokens/scored", adds up across ranks as it is
        return loss * (metrics["tokens/scored"] / max(totals[0], 1.0)), metrics


def zero_weighted(loss: Tensor, metrics: dict[str, float]) -> tuple[Tensor, dict[str, float]]:
    """The loss and metrics of a stand-in shard (see `Ranks.shard`): graph kept, contribution nothing."""
    return loss * 0.0, dict.fromkeys(metrics, 0.0)
