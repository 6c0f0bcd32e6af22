"""Training data for language-model runs: JSONL rows → token ids → length-bucketed, padded batches.

Preference rows are `{"prompt", "chosen", "rejected"}` strings; SFT rows are `{"messages": [...]}`
(tokenised by `sft.py`). Batches are a pure function of (seed, epoch), so a resumed run sees the
same order as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from policies.lm.mode_mixture import kept_prompt

log = logging.getLogger(__name__)


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


class JsonlRow(dict[str, Any]):
    """A row of a JSONL file that remembers its place, `where` ("FILE:LINE"). Why: a row can be unusable only to a
    later reader (a null response, a prompt of no tokens of its own: `tokenize_pairs`), after the rows were sampled
    or split (text_conditions, mixture_features), and the error must still name the line to fix."""

    where: str = ""


def row_place(row: Any, index: int) -> str:
    """Where `row` came from ("FILE:LINE" for a `load_jsonl` row; "row N" of its list for one built in memory)."""
    return getattr(row, "where", "") or f"row {index + 1}"


def load_jsonl(path: Path | str, required: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of a JSONL file (`JsonlRow`s), each checked to be a JSON object carrying the `required` keys.

    Every malformed line is a `DatasetError` "FILE:LINE: reason": a dataset comes from a snapshot or a user, and a
    raw UnicodeDecodeError (no path) or JSONDecodeError ("line 1 column 2" of the line, not of the file) sends
    whoever reads the failed run looking in the wrong place. Lines are split on bytes (line feeds, carriage returns):
    JSON strings may hold U+2028, which `str.splitlines` would cut through."""
    source = Path(path)
    if not source.exists():
        raise DatasetError(f"dataset {source} does not exist")
    rows: list[dict[str, Any]] = []
    for number, raw in enumerate(source.read_bytes().splitlines(), start=1):
        where = f"{source}:{number}"
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            raise DatasetError(f"{where}: not UTF-8 (byte {error.start + 1} of the line is "
                               f"{raw[error.start:error.start + 1]!r}); write the dataset as UTF-8") from None
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{where}: not JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(value, dict):
            raise DatasetError(f"{where}: a row must be a JSON object with {list(required)}, "
                               f"got {type(value).__name__} {_clip(value)}")
        missing = [k for k in required if k not in value]
        if missing:
            raise DatasetError(f"{where} lacks {missing}; each row needs {list(required)}")
        row = JsonlRow(value)
        row.where = where
        rows.append(row)
    if not rows:
        raise DatasetError(f"dataset {source} has no rows")
    return rows


def _clip(value: Any, width: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= width else text[:width] + "..."


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


PAIR_TEXTS = ("prompt", "chosen", "rejected")


def _pair_texts(row: Any, where: str) -> tuple[str, str, str]:
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: a pair must be an object with {list(PAIR_TEXTS)}, got {type(row).__name__}")
    missing = [k for k in PAIR_TEXTS if k not in row]
    if missing:
        raise DatasetError(f"{where} lacks {missing}; each pair needs {list(PAIR_TEXTS)}")
    wrong = [f"{k!r} is {_clip(row[k])}" for k in PAIR_TEXTS if not isinstance(row[k], str)]
    if wrong:
        raise DatasetError(f"{where}: {', '.join(wrong)}; prompt, chosen and rejected must be strings")
    return row["prompt"], row["chosen"], row["rejected"]


def tokenize_pairs(rows: Sequence[dict[str, Any]], tokenizer: Any) -> list[TokenizedPair]:
    """Tokenise as TRL does for plain-text pairs: EOS appended, completion starts where the ids diverge.

    A row that is not three strings, or whose prompt keeps no token of its own (an empty prompt, or one whose last
    token merges into the responses' first: "Wh" + "at is..."), is a `DatasetError` naming its line. Why refuse the
    latter rather than train on it: the mode mixture's w(x) pools the prompt's tokens, and serving reads a prompt of
    none no better (`prompt_log_weights` has no code for it; a chat prompt is never empty: the template renders the
    turn markers), so any code training made up would be one serving never computes. It is refused here, for every
    reader of pairs (DPO, the mixture, the condition tests, evaluation), so that all of them see the same pairs, as
    they cut them the same way (`truncate_pair`)."""
    eos = tokenizer.eos_token or ""
    pairs = []
    for index, row in enumerate(rows):
        where = row_place(row, index)
        prompt, chosen, rejected = _pair_texts(row, where)
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with_chosen = tokenizer(prompt + chosen, add_special_tokens=False)["input_ids"]
        with_rejected = tokenizer(prompt + rejected, add_special_tokens=False)["input_ids"]
        cut = min(_common_prefix(prompt_ids, with_chosen), _common_prefix(prompt_ids, with_rejected))
        if cut == 0:
            reason = "is empty" if not prompt_ids else \
                f"{_clip(prompt)} keeps no token of its own (its tokens merge into the responses' first)"
            raise DatasetError(f"{where}: the prompt {reason}; a pair needs a prompt the model reads before the "
                               "responses")
        pairs.append(TokenizedPair(prompt_ids[:cut], with_chosen[cut:], with_rejected[cut:]))
    return pairs


def truncate_pair(pair: TokenizedPair, max_length: int) -> TokenizedPair:
    """The pair as a model sees it at `max_length` tokens per sequence: the prompt keeps its last tokens, at most
    `max_length` less a reserve for the responses (`policies.lm.mode_mixture.kept_prompt`), and each response the
    start that fits after it. The one truncation rule of pairs: DPO's batches (`collate_pairs`) and every reader of
    pairs (the mode mixture's `encode_pairs`, the text condition tests' `pair_features`) cut through it, so a pair
    longer than the cap is read the same way everywhere. A pair within the cap, or one whose prompt fits in the cap
    less the reserve, is cut as before (TRL's `keep_start`); a longer prompt used to keep its start and leave both
    responses empty. Only a cap under 2 tokens (or a response of no token) still leaves a response empty:
    `readable_pairs` leaves such pairs out."""
    prompt = kept_prompt(pair.prompt_ids, max_length)
    room = max_length - len(prompt)
    return TokenizedPair(prompt, pair.chosen_ids[:room], pair.rejected_ids[:room])


def readable_pairs(pairs: Sequence[TokenizedPair], rows: Sequence[Any], cap: int) -> list[int]:
    """Indices of the (cut) `pairs` a model can tell apart: both responses keep a token, and not the same ones. A pair
    with an empty response has log-probability 0 on that side under every model, and one whose responses differ only
    after the cut (a long shared start) is a tie under every model: no preference signal, yet each counted as evidence
    (an expert response 'outside the proxy's image'; a good proxy read as a coin, and refused). The others are logged
    with a count; none left is a `DatasetError`, since a loss or a test over no pair would read as a result."""
    empty = {i for i, p in enumerate(pairs) if not (p.chosen_ids and p.rejected_ids)}
    same = {i for i, p in enumerate(pairs) if i not in empty and p.chosen_ids == p.rejected_ids}
    kept = [i for i in range(len(pairs)) if i not in empty | same]
    for left_out, what in ((empty, "keep no token of a response"), (same, "read the same tokens on both sides")):
        if left_out:
            first = min(left_out)
            log.warning("%d of %d pairs %s at %d tokens per sequence (first: %s); left out",
                        len(left_out), len(pairs), what, cap, row_place(rows[first], first))
    if pairs and not kept:
        raise DatasetError(f"all {len(pairs)} pairs keep no token of a response, or the same tokens on both sides, at "
                           f"{cap} tokens per sequence (first: {row_place(rows[0], 0)}); raise the recipe's "
                           "max_length or shorten the prompts")
    return kept


def _pad(rows: list[list[int]], value: int) -> Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def collate_pairs(pairs: Sequence[TokenizedPair], pad_token_id: int, max_length: int) -> dict[str, Tensor]:
    """[chosen rows; rejected rows] right-padded: input_ids, attention_mask, completion_mask, all [2B, T].

    Each sequence is cut to `max_length` tokens by `truncate_pair`.
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
