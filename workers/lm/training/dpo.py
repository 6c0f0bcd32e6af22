"""Direct preference training step: one forward over [chosen; rejected], reference log-probs precomputed.

The reference model's sequence log-probs do not change during a run, so they are computed once per
dataset (`reference_logps`) and cached beside the run's checkpoints; each step then costs a single
policy forward and backward.

Log-probs come from the chunked path (`chunked_logps.py`: the LM head a chunk of scored positions at a
time, no full-vocabulary logits kept for backward) wherever it applies, the plain forward otherwise;
`DPOConfig.logps_chunk_tokens = 0` selects the plain forward everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor

from workers.lm.training.chunked_logps import DEFAULT_CHUNK_TOKENS, body_and_head, chunked_token_logps
from workers.lm.training.data import TokenizedPair, collate_pairs
from workers.lm.training.dpo_config import DPOConfig
from workers.lm.training.objectives import nll_loss, preference_loss, sequence_logps, token_logps
from workers.lm.training.shared_prefix import shared_prefix_batch, shared_prefix_parts, shared_prefix_token_logps


def completion_token_logps(model: Any, batch: dict[str, Tensor], chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                           share_prompts: bool = True) -> tuple[Tensor, Tensor]:
    """Per-token log-probs [2B, K-1] of the batch's ids and the completion mask aligned with them.

    With `share_prompts` and a model and batch `shared_prefix.py` can run exactly, each pair's prompt
    runs once for both responses (K = T). Otherwise only the last K positions, from the earliest
    completion start in the batch, get logits (`logits_to_keep`): prompt positions never score, so the
    LM head skips them. With `chunk_tokens` > 0 and a model `body_and_head` recognises, the head runs on
    scored positions only, that many at a time (`chunked_logps.py`), and unscored positions hold 0; the
    masked sums are the same.
    """
    ids, completion = batch["input_ids"], batch["completion_mask"]
    shared_parts = shared_prefix_parts(model) if share_prompts else None
    shared = shared_prefix_batch(batch) if shared_parts is not None else None
    if shared_parts is not None and shared is not None:
        shape = (ids.shape[0], ids.shape[1] - 1)
        return shared_prefix_token_logps(*shared_parts, shared, shape, chunk_tokens), completion[:, 1:]
    width = ids.shape[1]
    first = int(completion.argmax(dim=1).min())  # sync point: earliest completion token in the batch
    keep = width - max(first - 1, 0)  # position first-1 predicts the first completion token
    mask = completion[:, width - keep + 1:]
    parts = body_and_head(model) if chunk_tokens > 0 else None
    if parts is not None:
        return chunked_token_logps(*parts, ids, batch["attention_mask"], mask, chunk_tokens), mask
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False,
                   logits_to_keep=keep).logits
    return token_logps(logits, ids[:, width - keep:]), mask


def dpo_batch_loss(
    model: Any, batch: dict[str, Tensor], reference_chosen: Tensor, reference_rejected: Tensor, config: DPOConfig,
) -> tuple[Tensor, dict[str, float]]:
    """Loss of one micro-batch of B pairs (batch rows are [chosen; rejected]) against reference log-probs [B]."""
    per_token, mask = completion_token_logps(model, batch, config.logps_chunk_tokens, config.share_prompts)
    logps = sequence_logps(per_token, mask, config.reduction)
    chosen, rejected = logps.chunk(2, dim=0)
    loss, metrics = preference_loss(config.loss_type, chosen, rejected, reference_chosen, reference_rejected,
                                    config.beta)
    if config.nll_weight:
        chosen_tokens, _ = per_token.chunk(2, dim=0)
        chosen_mask, _ = mask.chunk(2, dim=0)
        nll = nll_loss(chosen_tokens, chosen_mask)
        metrics["nll/chosen"] = float(nll.detach())
        loss = loss + config.nll_weight * nll
    return loss, metrics


@torch.no_grad()
def reference_logps(
    model: Any, pairs: Sequence[TokenizedPair], config: DPOConfig, pad_token_id: int, device: torch.device,
    autocast: AbstractContextManager[Any],
) -> tuple[Tensor, Tensor]:
    """Sequence log-probs [N] of chosen and rejected responses under `model` (the frozen reference)."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(pairs), config.batch_size):
        batch = collate_pairs(pairs[start:start + config.batch_size], pad_token_id, config.max_length)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast:
            per_token, mask = completion_token_logps(model, batch, config.logps_chunk_tokens, config.share_prompts)
        c, r = sequence_logps(per_token, mask, config.reduction).float().cpu().chunk(2, dim=0)
        chosen.append(c)
        rejected.append(r)
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)
