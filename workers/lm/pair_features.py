"""What a stage-1 model says about preference pairs: the arrays the text condition tests read.

For each pair, one forward of the stage-1 model (with its simplex bottleneck) and one of the base
model over [chosen; rejected]: the mean log-simplex point of each response's tokens (τ̃'s view),
the base model's mean last hidden state of the same tokens (a path around the bottleneck, from a
model no proxy trained), and DPO's implicit reward margin of the stage-1 model against the base.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor

from policies.lm.conditions import TextPairFeatures
from policies.lm.mode_mixture import sequence_cap
from policies.lm.simplex_bottleneck import simplex_points
from workers.lm.training.data import TokenizedPair, collate_pairs
from workers.lm.training.objectives import sequence_logps, token_logps

BATCH = 32


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    weights = mask.to(values.dtype).unsqueeze(-1)
    return (values * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def _forward(model: Any, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(last hidden state [2B, T, H], sequence log-probs of the completions [2B])."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True,
                use_cache=False)
    per_token = token_logps(out.logits, batch["input_ids"])
    return out.hidden_states[-1].float(), sequence_logps(per_token, batch["completion_mask"][:, 1:], "sum")


@torch.no_grad()
def pair_features(
    stage1: Any, base: Any, pairs: Sequence[TokenizedPair], pad_token_id: int, beta: float, max_length: int = 512,
    device: torch.device | str = "cpu",
) -> TextPairFeatures:
    """Features of `pairs` under the stage-1 model (which must have its bottleneck) and the base model, each sequence
    cut to `max_length` or the shorter model context (`sequence_cap`): `max_length` alone let a pair run past a
    context shorter than it."""
    stage1.eval()
    base.eval()
    cap = min(sequence_cap(stage1, max_length), sequence_cap(base, max_length))
    # The arrays only: `mixture` (a mode mixture's terms) is not read from a bottleneck model, and an empty list of
    # blocks for it failed every call.
    parts: dict[str, list[Tensor]] = {f.name: [] for f in fields(TextPairFeatures) if f.name != "mixture"}
    for start in range(0, len(pairs), BATCH):
        batch = {k: v.to(device) for k, v in collate_pairs(pairs[start:start + BATCH], pad_token_id, cap).items()}
        hidden1, logps1 = _forward(stage1, batch)
        hidden0, logps0 = _forward(base, batch)
        mask = batch["completion_mask"]  # rows are [chosen; rejected]
        for name, values in (("simplex", _masked_mean(simplex_points(stage1, hidden1), mask)),
                             ("direct", _masked_mean(hidden0, mask))):
            chosen, rejected = values.cpu().chunk(2)
            parts[f"{name}_chosen"].append(chosen)
            parts[f"{name}_rejected"].append(rejected)
        chosen, rejected = (logps1 - logps0).chunk(2)
        parts["proxy_margin"].append((beta * (chosen - rejected)).cpu())
    arrays = {name: torch.cat(blocks).double().numpy() for name, blocks in parts.items()}
    return TextPairFeatures(arrays["simplex_chosen"], arrays["simplex_rejected"], arrays["direct_chosen"],
                            arrays["direct_rejected"], arrays["proxy_margin"])
