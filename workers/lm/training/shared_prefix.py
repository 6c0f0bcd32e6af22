"""DPO log-probs with each pair's prompt run once: [prompt | chosen | rejected] rows, short pairs packed together.

Why: a DPO batch is [chosen rows; rejected rows], and both rows of a pair start with the same prompt, so
the usual forward runs every prompt token twice. Under causal attention a prompt token's hidden state
does not depend on anything after it, so one copy serves both completions exactly: the row holds the
prompt, then the chosen response, then the rejected one, with an attention mask that lets each
response see the prompt and itself but not the other response, and position ids that restart the
rejected response where the prompt ends; pairs shorter than the batch's longest share a row, each seeing
only itself, so padding is left only at row ends. The same log-probs and gradients come out for
2·(P + C) − (P + 2C) = P fewer tokens per pair through the decoder body: a third fewer when prompts are
twice as long as responses (Wang et al. 2024, "Accelerating Direct Preference Optimization with Prefix
Sharing", arXiv 2410.20305, report 1.1–1.6× training throughput on real preference sets). TRL 1.16's
DPOTrainer has no such mode.

When it applies (`shared_prefix_parts`): the chunked path's model check (`chunked_logps.body_and_head`:
the body and head are the whole forward, no DDP/FSDP wrapper), a class in `SHARED_PREFIX_CLASSES`
whose decoder takes a custom 4D mask and position ids as given (checked by a parity test per class),
and an attention implementation that honours an arbitrary mask (sdpa, eager). The batch must be what
`collate_pairs` makes (right-padded, each response a contiguous run after the same prompt); anything
else takes the unshared path, so no model or batch silently gets a different computation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from workers.lm.training.chunked_logps import body_and_head, head_logps

# Decoders whose forward in transformers 5.x passes a 4D attention mask through unchanged and builds
# rotary or learned positions from `position_ids`; each is covered by tests/workers/test_shared_prefix.py.
SHARED_PREFIX_CLASSES = frozenset({"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GPT2LMHeadModel"})
MASKABLE_ATTENTION = frozenset({"sdpa", "eager"})


@dataclass(frozen=True)
class SharedPrefixBatch:
    """Rows of whole pairs, one pair per row or several short ones side by side. Scored token i sits in row
    `row[i]`: the hidden state at `predictor[i]` scores the id at `target[i]`; `standard` [N] is where that
    log-prob sits in the unshared per-token layout [2B, T-1] (flattened), so callers keep one layout."""

    input_ids: Tensor  # [R, W], R ≤ B rows
    position_ids: Tensor  # [R, W]
    allowed: Tensor  # [R, 1, W, W] bool: query may attend to key
    row: Tensor  # [N]
    predictor: Tensor  # [N]
    target: Tensor  # [N]
    standard: Tensor  # [N]


def shared_prefix_parts(model: Any) -> tuple[nn.Module, nn.Module, str] | None:
    """(body, head, attention implementation) when `model` can run shared-prefix rows exactly, else None."""
    parts = body_and_head(model)
    if parts is None:
        return None
    causal: Any = model.get_base_model() if hasattr(model, "peft_config") else model
    implementation = getattr(causal.config, "_attn_implementation", None)
    if type(causal).__name__ not in SHARED_PREFIX_CLASSES or implementation not in MASKABLE_ATTENTION:
        return None
    return parts[0], parts[1], str(implementation)


def shared_prefix_batch(batch: dict[str, Tensor]) -> SharedPrefixBatch | None:
    """The shared-prefix rows of a `collate_pairs` batch, or None when its rows are not pairs of
    right-padded [prompt | response] sequences over one prompt each."""
    ids, attention, completion = batch["input_ids"], batch["attention_mask"].bool(), batch["completion_mask"].bool()
    pairs, width = ids.shape[0] // 2, ids.shape[1]
    if ids.shape[0] != 2 * pairs or pairs == 0:
        return None
    lengths, answer = attention.sum(1), completion.sum(1)
    column = torch.arange(width, device=ids.device)
    prompt = lengths - answer
    right_padded = torch.equal(attention, column < lengths[:, None])
    contiguous = torch.equal(completion, (column >= prompt[:, None]) & (column < lengths[:, None]))
    if not (right_padded and contiguous and torch.equal(prompt[:pairs], prompt[pairs:])):
        return None
    p, chosen_len, rejected_len = prompt[:pairs], answer[:pairs], answer[pairs:]
    in_prompt = column < p[:, None]
    if not torch.equal(torch.where(in_prompt, ids[:pairs], 0), torch.where(in_prompt, ids[pairs:], 0)):
        return None  # different prompts in one pair
    chosen_end, end = p + chosen_len, p + chosen_len + rejected_len
    span = int(end.max())  # host sync, as the unshared path's keep
    j = torch.arange(span, device=ids.device)[None, :]  # [1, W] in each pair's own layout; packing reads j < end only
    is_chosen = (j >= p[:, None]) & (j < chosen_end[:, None])
    is_rejected = (j >= chosen_end[:, None]) & (j < end[:, None])
    source_row = torch.where(is_rejected, torch.arange(pairs, 2 * pairs, device=ids.device)[:, None],
                             torch.arange(pairs, device=ids.device)[:, None])
    source_col = torch.where(is_rejected, j - chosen_len[:, None], j).clamp(max=width - 1)
    input_ids = ids[source_row, source_col]
    segment = is_chosen.long() + 2 * is_rejected.long()  # 0 prompt, 1 chosen, 2 rejected
    positions = torch.arange(span, device=ids.device)
    causal = positions[None, :] <= positions[:, None]  # [query, key]: the key is not after the query
    same = (segment[:, :, None] == segment[:, None, :]) | (segment[:, None, :] == 0)
    allowed = causal[None] & same
    # Scored targets: response tokens after position 0 of their own sequence (as `token_logps` scores them).
    scored = (is_chosen | is_rejected) & (source_col >= 1)
    first_rejected = is_rejected & (j == chosen_end[:, None])
    predictor = torch.where(first_rejected, p[:, None] - 1, j - 1)
    pair, target = scored.nonzero(as_tuple=True)
    standard = source_row[pair, target] * (width - 1) + source_col[pair, target] - 1
    # Padding-free: pairs shorter than the longest share rows (first fit, longest first); a pair sees only itself.
    row_of, offset, pair_at, local = _first_fit(end.tolist(), span, ids.device)
    filled = pair_at >= 0
    at, lo = pair_at.clamp(min=0), local
    packed = (allowed[at[:, :, None], lo[:, :, None], lo[:, None, :]] & (pair_at[:, :, None] == pair_at[:, None, :])
              & filled[:, :, None])
    packed |= torch.eye(span, dtype=torch.bool, device=ids.device)[None] & ~filled[:, :, None]  # no empty rows
    return SharedPrefixBatch(input_ids=input_ids[at, lo] * filled, position_ids=source_col[at, lo] * filled,
                             allowed=packed[:, None], row=row_of[pair], target=offset[pair] + target,
                             predictor=offset[pair] + predictor[pair, target], standard=standard)


def _first_fit(spans: list[int], width: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each pair's row and offset when pairs are laid longest first into the first row with room (rows `width`
    wide), and per row position the pair there (−1: empty) and its position within the pair, [R, width] each."""
    used: list[int] = []
    row_of, offset = [0] * len(spans), [0] * len(spans)
    for b in sorted(range(len(spans)), key=lambda i: -spans[i]):
        row = next((r for r, taken in enumerate(used) if taken + spans[b] <= width), len(used))
        if row == len(used):
            used.append(0)
        row_of[b], offset[b] = row, used[row]
        used[row] += spans[b]
    pair_at, local = [[-1] * width for _ in used], [[0] * width for _ in used]
    for b, span in enumerate(spans):
        pair_at[row_of[b]][offset[b]:offset[b] + span] = [b] * span
        local[row_of[b]][offset[b]:offset[b] + span] = list(range(span))
    return (torch.tensor(row_of, device=device), torch.tensor(offset, device=device),
            torch.tensor(pair_at, device=device), torch.tensor(local, device=device))


def shared_prefix_token_logps(body: nn.Module, head: nn.Module, implementation: str, shared: SharedPrefixBatch,
                              shape: tuple[int, int], chunk_tokens: int) -> Tensor:
    """Per-token log-probs in the unshared layout `shape` = [2B, T-1] (0 where nothing is scored)."""
    mask: Tensor = shared.allowed
    if implementation == "eager":  # eager adds the mask to the scores: 0 where allowed, a large negative elsewhere
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    hidden = body(input_ids=shared.input_ids, attention_mask=mask, position_ids=shared.position_ids,
                  use_cache=False).last_hidden_state
    if not len(shared.row):  # nothing scored: a zero that still hangs off the graph, as on the other paths
        return (hidden.sum() * 0.0).float().expand(shape)
    logps = head_logps(head, hidden[shared.row, shared.predictor], shared.input_ids[shared.row, shared.target],
                       chunk_tokens)
    flat = torch.zeros(shape[0] * shape[1], dtype=logps.dtype, device=logps.device)
    return flat.index_put((shared.standard,), logps).view(shape)
