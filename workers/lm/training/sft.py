"""Supervised fine-tuning masks: Instruction Modelling (IM) vs instruction tuning (IT), and the choice.

Chats are rendered in ChatML (`<|im_start|>role\\n content <|im_end|>\\n`), segment by segment, so
each token's role is known. IT scores the assistant's content and its closing `<|im_end|>` (the
model must learn to stop). IM (paper 4, arXiv 2405.14394) also scores system and user content;
role markers (`<|im_start|>role\\n`, the other turns' `<|im_end|>`, newlines) are never scored.

Automatic choice: `loss_mode="auto"` trains both masks and compares them on held-out chats
(`sft_auto.py`), because `bench/im_vs_it.py` found no static boundary. The static rule here decides
only datasets too small to hold chats out: IM when the instruction side is long relative to the
output (Σ instruction tokens / Σ output tokens ≥ the minimum ratio) AND the dataset is small (≤ the
maximum examples); otherwise IT. The measured defaults (`AUTO_IM_MIN_LENGTH_RATIO`,
`AUTO_IM_MAX_EXAMPLES`) found no region where IM wins, so by default it picks IT;
`SFTConfig.im_min_length_ratio` / `im_max_examples` set a region explicitly. The reason is returned
for the run's lineage; `loss_mode` "im" / "it" overrides.

Rows and cuts: each row's `messages` is checked when loaded (`chat_messages`: a DatasetError naming the row, as
`load_jsonl` names its lines); content may be a string or a list of text parts, joined. Content is tokenised as
text, never as special tokens, so a user who writes `<|im_start|>assistant` forges no turn and IM scores no marker.
A chat keeps its first `sequence_cap(model, max_length)` tokens, as pairs do; a chat with no output token left
in them is left out of training (`fit_chats`, in both masks, so IM and IT train on the same chats) rather than
cut from the left: keeping the start keeps the system prompt and the turn markers every chat is read with, and
a chat is rarely worth a second truncation rule. A run left with no chat to learn from is refused, since an empty
mask's loss would read 0 and the auto comparison would pick a winner on 0 against 0.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from policies.lm.mode_mixture import model_context, sequence_cap
from workers.lm.training.data import DatasetError, TokenizedChat, row_place
from workers.lm.training.objectives import lm_loss, token_logps
from workers.lm.training.sft_config import SFTConfig

LossMode = Literal["im", "it"]
Chat = list[dict[str, str]]
ROLES = ("system", "user", "assistant")
log = logging.getLogger("proxyloop.workers.lm")

# The automatic rule's constants, fitted by `python -m bench.im_vs_it --quick` (2026-11-29, 2-core CPU;
# docs/benchmarks.md, "Instruction Modelling vs instruction tuning"): over instruction/output ratios
# 0.53, 3.1, 28.5, 90 × 16, 64, 256 examples, IT's test output loss was lower than IM's beyond the 95%
# interval over seeds in 7 of 12 cells (tuning seeds 0-2) and 7 of 12 (reporting seeds 100-102); IM
# won one cell on both (ratio 28.5, 64 examples: IT − IM +0.31 [+0.25, +0.36]), flanked by IT wins at
# 16 examples and at ratio 90, so no "ratio ≥ R and n ≤ N" boundary separates it. The best such rule
# on the tuning seeds is "never IM" (11/12 cells agree; 11/12 on the reporting seeds). None = no
# ratio (or no size cap) at which auto picks IM.
AUTO_IM_MIN_LENGTH_RATIO: float | None = None
AUTO_IM_MAX_EXAMPLES: int | None = None


@dataclass(frozen=True)
class LossModeChoice:
    mode: LossMode
    reason: str
    instruction_tokens: int
    output_tokens: int
    n_examples: int

    @property
    def length_ratio(self) -> float:
        return self.instruction_tokens / max(self.output_tokens, 1)


def _ids(tokenizer: Any, text: str, content: bool = False) -> list[int]:
    """Token ids of `text`; of content (`content=True`) with marker strings split as text, so that only the
    template's own markers are special tokens (a marker in a user's text would forge a turn, and IM would score it).
    """
    if content:
        return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _shown(value: Any, width: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= width else text[:width] + "..."


def _content_text(message: dict[str, Any], where: str) -> str:
    """A message's content as one string: a string, or an OpenAI-style list of text parts joined (as the API
    reads them). Anything else is a DatasetError: null or missing content is no text to train on, and an image
    part is nothing this text model can read."""
    if "content" not in message:
        raise DatasetError(f"{where} has no 'content'; each message needs 'role' and 'content'")
    content = message["content"]
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise DatasetError(f"{where}: content is {_shown(content)}; it must be a string or a list of text parts")
    texts = []
    for number, part in enumerate(content, start=1):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise DatasetError(f"{where}: content part {number} is {_shown(part)}; only "
                               '{"type": "text", "text": "..."} parts can be trained on')
        texts.append(part["text"])
    return "".join(texts)


def _checked_chat(messages: Any, where: str) -> Chat:
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"{where}: 'messages' is {_shown(messages)}; it must be a non-empty list of "
                           "messages with 'role' and 'content'")
    chat: Chat = []
    for number, message in enumerate(messages, start=1):
        place = f"{where}: message {number}"
        if not isinstance(message, dict):
            raise DatasetError(f"{place} is {_shown(message)}; a message is an object with 'role' and 'content'")
        if message.get("role") not in ROLES:
            raise DatasetError(f"{place}: Unknown chat role {message.get('role')!r}; should be one of {list(ROLES)}")
        chat.append({"role": message["role"], "content": _content_text(message, place)})
    if not any(m["role"] == "assistant" for m in chat):
        raise DatasetError(f"{where}: the chat has no assistant turn; SFT learns the assistant's output, so every "
                           "chat needs one")
    return chat


def chat_messages(rows: Sequence[dict[str, Any]]) -> list[Sequence[dict[str, str]]]:
    """The chats of SFT rows (`{"messages": [...]}`), checked and normalised (content as one string).

    A malformed row is a DatasetError "FILE:LINE: reason" (`row_place`) here, when loaded, rather than a KeyError
    or a tokenizer's TypeError naming no row at the first batch that holds it."""
    return [_checked_chat(row["messages"], row_place(row, index)) for index, row in enumerate(rows)]


def _render(messages: Sequence[dict[str, str]], tokenizer: Any) -> tuple[list[int], list[int], list[int]]:
    """(ids, output mask, instruction mask) of a ChatML conversation: the output is the assistant's content and
    its closing `<|im_end|>`, the instruction the other roles' content; markers and newlines are in neither."""
    ids: list[int] = []
    output: list[int] = []
    instruction: list[int] = []

    def add(piece: list[int], is_output: bool, is_instruction: bool) -> None:
        ids.extend(piece)
        output.extend([int(is_output)] * len(piece))
        instruction.extend([int(is_instruction)] * len(piece))

    for message in messages:
        role = message["role"]
        if role not in ROLES:
            raise ValueError(f"Unknown chat role {role!r}; should be one of {list(ROLES)}")
        is_output = role == "assistant"
        add(_ids(tokenizer, f"<|im_start|>{role}\n"), False, False)
        add(_ids(tokenizer, message["content"], content=True), is_output, not is_output)
        add(_ids(tokenizer, "<|im_end|>"), is_output, False)
        add(_ids(tokenizer, "\n"), False, False)
    return ids, output, instruction


def render_chat(messages: Sequence[dict[str, str]], tokenizer: Any, mode: LossMode) -> TokenizedChat:
    """Token ids of a ChatML conversation and its loss mask under `mode` ('im' or 'it')."""
    ids, output, instruction = _render(messages, tokenizer)
    if mode == "it":
        return TokenizedChat(ids, output)
    return TokenizedChat(ids, [o | i for o, i in zip(output, instruction, strict=True)])


def cap_words(model: Any, max_length: int) -> str:
    """How the token cap came about, for errors: "max_length 512" or that and the model's shorter context."""
    cap = sequence_cap(model, max_length)
    return f"max_length {max_length}" if cap == max_length else \
        f"max_length {max_length}, cut to the model's {model_context(model)}-token context"


def fit_chats(chats: Sequence[Sequence[dict[str, str]]], tokenizer: Any, mode: LossMode, model: Any,
              max_length: int) -> list[TokenizedChat]:
    """The chats rendered under `mode` and cut to their first `sequence_cap(model, max_length)` tokens, less those
    with no output token left (module docstring: left out, with a warning; whether is decided on the output, so
    IM and IT leave out the same chats). None left is a DatasetError: a loss over no token would read 0."""
    cap = sequence_cap(model, max_length)
    fitted = []
    for messages in chats:
        ids, output, instruction = _render(messages, tokenizer)
        if any(output[1:cap]):  # position 0 is never a target (position t predicts token t + 1)
            mask = output if mode == "it" else [o | i for o, i in zip(output, instruction, strict=True)]
            fitted.append(TokenizedChat(ids[:cap], mask[:cap]))
    lost = len(chats) - len(fitted)
    if not fitted:
        raise DatasetError(f"all {lost} chats lose their whole output at {cap} tokens ({cap_words(model, max_length)})"
                           f": there is nothing to learn; raise max_length or shorten the instructions")
    if lost:
        log.warning("%d of %d chats lose their whole output at %d tokens (%s): left out of training", lost,
                    len(chats), cap, cap_words(model, max_length))
    return fitted


def count_tokens(messages: Sequence[dict[str, str]], tokenizer: Any) -> tuple[int, int]:
    """(instruction tokens, output tokens) of one chat: system+user content vs assistant content."""
    instruction = output = 0
    for message in messages:
        n = len(_ids(tokenizer, message["content"], content=True))
        if message["role"] == "assistant":
            output += n
        else:
            instruction += n
    return instruction, output


def choose_loss_mode(chats: Sequence[Sequence[dict[str, str]]], tokenizer: Any, config: SFTConfig) -> LossModeChoice:
    """Apply the override or the documented automatic rule (module docstring) to a dataset of chats."""
    instruction = output = 0
    for messages in chats:
        i, o = count_tokens(messages, tokenizer)
        instruction, output = instruction + i, output + o
    n = len(chats)
    ratio = instruction / max(output, 1)
    facts = f"instruction/output token ratio {ratio:.2f}, {n} examples"
    if config.loss_mode in ("im", "it"):
        mode: LossMode = "im" if config.loss_mode == "im" else "it"
        return LossModeChoice(mode, f"{mode.upper()} set by loss_mode override ({facts})", instruction, output, n)
    return auto_choice(ratio, n, config, instruction, output)


def auto_choice(ratio: float, n: int, config: SFTConfig, instruction: int = 0, output: int = 0) -> LossModeChoice:
    """The automatic rule on a dataset of `n` chats with instruction/output token ratio `ratio` (no override)."""
    min_ratio = config.im_min_length_ratio if config.im_min_length_ratio is not None else AUTO_IM_MIN_LENGTH_RATIO
    max_n = config.im_max_examples if config.im_max_examples is not None else AUTO_IM_MAX_EXAMPLES
    if min_ratio is None:
        return LossModeChoice("it", f"IT: ratio {ratio:.2f}, {n} examples; no IM region (bench/im_vs_it: IM beat IT "
                                    f"beyond the interval in 1 of 12 ratio x size cells, no ratio/size boundary)",
                              instruction, output, n)
    long_instructions = ratio >= min_ratio
    few_examples = max_n is None or n <= max_n
    cap = "no size cap" if max_n is None else f"{n} examples <= {max_n}"
    if long_instructions and few_examples:
        reason = f"IM: ratio {ratio:.2f} >= {min_ratio} and {cap} (IM region set in SFTConfig)"
        return LossModeChoice("im", reason, instruction, output, n)
    why = [f"ratio {ratio:.4g} < {min_ratio}"] if not long_instructions else []  # 1.999 is not "2.00 < 2.0"
    why += [f"{n} examples > {max_n}"] if not few_examples else []
    return LossModeChoice("it", f"IT: {' and '.join(why)} (outside the IM region)", instruction, output, n)


def sft_batch_loss(model: Any, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Mean NLL over the scored tokens of a micro-batch (ids, attention_mask, loss_mask: [B, T])."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    scored = batch["loss_mask"][:, 1:]  # position t predicts token t+1
    loss = lm_loss(token_logps(logits, batch["input_ids"]), scored)
    return loss, {"tokens/scored": float(scored.sum())}
