"""What a stage-1 model says about preference pairs: the arrays the text condition tests read.

For each pair, one forward of the stage-1 model (with its simplex bottleneck) and one of the base
model over [chosen; rejected]: the mean log-simplex point of each response's tokens (τ̃'s view),
the base model's mean last hidden state of the same tokens (a path around the bottleneck, from a
model no proxy trained), and DPO's implicit reward margin of the stage-1 model against the base.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from policies.lm.conditions import TextPairFeatures
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
    """Features of `pairs` under the stage-1 model (which must have its bottleneck) and the base model."""
    stage1.eval()
    base.eval()
    parts: dict[str, list[Tensor]] = {"simplex": [], "direct": [], "margin": []}
    for start in range(0, len(pairs), BATCH):
        batch = {k: v.to(device) for k, v in collate_pairs(pairs[start:start + BATCH], pad_token_id,
                                                          max_length).items()}
        hidden1, logps1 = _forward(stage1, batch)
        hidden0, logps0 = _forward(base, batch)
        mask = batch["completion_mask"]
        parts["simplex"].append(_masked_mean(simplex_points(stage1, hidden1), mask).cpu())
        parts["direct"].append(_masked_mean(hidden0, mask).cpu())
        chosen, rejected = (logps1 - logps0).chunk(2)
        parts["margin"].append((beta * (chosen - rejected)).cpu())

    def halves(name: str) -> tuple[np.ndarray, np.ndarray]:
        chosen_rows, rejected_rows = [], []
        for block in parts[name]:
            c, r = block.chunk(2)
            chosen_rows.append(c)
            rejected_rows.append(r)
        return torch.cat(chosen_rows).double().numpy(), torch.cat(rejected_rows).double().numpy()

    simplex_c, simplex_r = halves("simplex")
    direct_c, direct_r = halves("direct")
    return TextPairFeatures(simplex_chosen=simplex_c, simplex_rejected=simplex_r, direct_chosen=direct_c,
                            direct_rejected=direct_r, proxy_margin=torch.cat(parts["margin"]).double().numpy())
