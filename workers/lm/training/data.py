"""Training data for language-model runs: JSONL rows → token ids → length-bucketed, padded batches.

Preference rows are `{"prompt", "chosen", "rejected"}` strings; SFT rows are `{"messages": [...]}`
(tokenised by `sft.py`). Batches are a pure function of (seed, epoch), so a resumed run sees the
same order as an uninterrupted one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


class DatasetError(ValueError):
    """A training dataset is missing, empty or has rows of the wrong shape."""


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass(frozen=True)
class TokenizedChat:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token at this position is a training target

    @property
    def length(self) -> int:
        return len(self.input_ids)


def load_jsonl(path: Path | str, required: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of a JSONL file, each checked to carry the `required` keys."""
    source = Path(path)
    if not source.exists():
        raise DatasetError(f"dataset {source} does not exist")
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(source.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = [k for k in required if k not in row]
        if missing:
            raise DatasetError(f"{source}:{number} lacks {missing}; each row needs {list(required)}")
        rows.append(row)
    if not rows:
        raise DatasetError(f"dataset {source} has no rows")
    return rows


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def tokenize_pairs(rows: Sequence[dict[str, Any]], tokenizer: Any) -> list[TokenizedPair]:
    """Tokenise as TRL does for plain-text pairs: EOS appended, completion starts where the ids diverge."""
    eos = tokenizer.eos_token or ""
    pairs = []
    for row in rows:
        chosen, rejected = row["chosen"], row["rejected"]
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        prompt_ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        with_chosen = tokenizer(row["prompt"] + chosen, add_special_tokens=False)["input_ids"]
        with_rejected = tokenizer(row["prompt"] + rejected, add_special_tokens=False)["input_ids"]
        cut = min(_common_prefix(prompt_ids, with_chosen), _common_prefix(prompt_ids, with_rejected))
        pairs.append(TokenizedPair(prompt_ids[:cut], with_chosen[cut:], with_rejected[cut:]))
    return pairs


def truncate_pair(pair: TokenizedPair, max_length: int) -> TokenizedPair:
    """The pair as a model sees it at `max_length` tokens per sequence: prompt + chosen and prompt + rejected each
    keep their first `max_length` tokens, as TRL's default `keep_start`. The one truncation rule of pairs: DPO's
    batches (`collate_pairs`) and every reader of pairs (the mode mixture's `encode_pairs`, the text condition
    tests' `pair_features`) cut through it, so a pair longer than the cap is read the same way everywhere. A prompt
    of `max_length` tokens or more leaves both responses empty."""
    prompt = pair.prompt_ids[:max_length]
    room = max_length - len(prompt)
    return TokenizedPair(prompt, pair.chosen_ids[:room], pair.rejected_ids[:room])


def model_context(model: Any) -> int | None:
    """The longest sequence `model` is built for (its position table or its configured context), if it says."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def sequence_cap(model: Any, max_length: int) -> int:
    """Tokens per sequence when `model` reads pairs at a recipe's `max_length`: that, or the model's context if
    shorter. Why both: the recipe's cap bounds the cost of a run whatever text a snapshot holds (one 20 KB proxy
    response is 16k tokens: 10 GB of activations in one forward), and past its context a model with a position table
    fails and one with rotary positions reads positions it never trained on."""
    context = model_context(model)
    return max_length if context is None else min(max_length, context)


def _pad(rows: list[list[int]], value: int) -> Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def collate_pairs(pairs: Sequence[TokenizedPair], pad_token_id: int, max_length: int) -> dict[str, Tensor]:
    """[chosen rows; rejected rows] right-padded: input_ids, attention_mask, completion_mask, all [2B, T].

    Each sequence is cut to `max_length` tokens by `truncate_pair` (keeps the start).
    """
    pairs = [truncate_pair(p, max_length) for p in pairs]
    ids = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    completion = [[0] * len(p.prompt_ids) + [1] * len(p.chosen_ids) for p in pairs]
    completion += [[0] * len(p.prompt_ids) + [1] * len(p.rejected_ids) for p in pairs]
    return {"input_ids": _pad(ids, pad_token_id), "attention_mask": _pad([[1] * len(r) for r in ids], 0),
            "completion_mask": _pad(completion, 0)}


def collate_chats(chats: Sequence[TokenizedChat], pad_token_id: int, max_length: int) -> dict[str, Tensor]:
    """input_ids, attention_mask, loss_mask, all [B, T], right-padded and truncated to `max_length`."""
    ids = [c.input_ids[:max_length] for c in chats]
    return {"input_ids": _pad(ids, pad_token_id), "attention_mask": _pad([[1] * len(r) for r in ids], 0),
            "loss_mask": _pad([c.loss_mask[:max_length] for c in chats], 0)}


def bucketed_batches(lengths: Sequence[int], batch_size: int, bucket_factor: int, seed: int,
                     epoch: int) -> list[list[int]]:
    """Micro-batches of example indices for one epoch, grouped by similar length to waste little padding.

    Shuffle, sort by length inside windows of `bucket_factor` batches, cut into batches, shuffle the
    batches: random enough to train on, tight enough to pad little. Deterministic in (seed, epoch).
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * bucket_factor
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of padded positions over all positions of the batches (0 = no waste)."""
    real = sum(lengths[i] for b in batches for i in b)
    total = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1.0 - real / total if total else 0.0
