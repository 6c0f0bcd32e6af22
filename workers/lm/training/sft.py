"""Supervised fine-tuning masks: Instruction Modelling (IM) vs instruction tuning (IT), and the choice.

Chats are rendered in ChatML (`<|im_start|>role\\n content <|im_end|>\\n`), segment by segment, so
each token's role is known. IT scores the assistant's content and its closing `<|im_end|>` (the
model must learn to stop). IM (paper 4, arXiv 2405.14394) also scores system and user content;
role markers (`<|im_start|>role\\n`, the other turns' `<|im_end|>`, newlines) are never scored.

Automatic choice (paper 4 gives no threshold; the rule is ours): IM when the instruction side is
long relative to the output (Σ instruction tokens / Σ output tokens ≥ `im_min_length_ratio`) AND
the dataset is small (≤ `im_max_examples`), the two conditions under which paper 4 reports IM's
gains; otherwise IT. The reason is returned for the run's lineage; `loss_mode` overrides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from workers.lm.training.data import TokenizedChat
from workers.lm.training.objectives import lm_loss, token_logps
from workers.lm.training.sft_config import SFTConfig

LossMode = Literal["im", "it"]
ROLES = ("system", "user", "assistant")


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


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def render_chat(messages: Sequence[dict[str, str]], tokenizer: Any, mode: LossMode) -> TokenizedChat:
    """Token ids of a ChatML conversation and its loss mask under `mode` ('im' or 'it')."""
    ids: list[int] = []
    mask: list[int] = []

    def add(text: str, scored: bool) -> None:
        piece = _ids(tokenizer, text)
        ids.extend(piece)
        mask.extend([int(scored)] * len(piece))

    for message in messages:
        role = message["role"]
        if role not in ROLES:
            raise ValueError(f"Unknown chat role {role!r}; should be one of {list(ROLES)}")
        is_output = role == "assistant"
        add(f"<|im_start|>{role}\n", False)
        add(message["content"], is_output or mode == "im")
        add("<|im_end|>", is_output)
        add("\n", False)
    return TokenizedChat(ids, mask)


def count_tokens(messages: Sequence[dict[str, str]], tokenizer: Any) -> tuple[int, int]:
    """(instruction tokens, output tokens) of one chat: system+user content vs assistant content."""
    instruction = output = 0
    for message in messages:
        n = len(_ids(tokenizer, message["content"]))
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
    long_instructions = ratio >= config.im_min_length_ratio
    few_examples = n <= config.im_max_examples
    if long_instructions and few_examples:
        reason = (f"IM: ratio {ratio:.2f} >= {config.im_min_length_ratio} and {n} examples <= "
                  f"{config.im_max_examples} (paper 4: IM helps with long instructions and few examples)")
        return LossModeChoice("im", reason, instruction, output, n)
    why = [f"ratio {ratio:.2f} < {config.im_min_length_ratio}"] if not long_instructions else []
    why += [f"{n} examples > {config.im_max_examples}"] if not few_examples else []
    return LossModeChoice("it", f"IT: {' and '.join(why)} (IM's gains need both long instructions and few "
                                f"examples)", instruction, output, n)


def sft_batch_loss(model: Any, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Mean NLL over the scored tokens of a micro-batch (ids, attention_mask, loss_mask: [B, T])."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    scored = batch["loss_mask"][:, 1:]  # position t predicts token t+1
    loss = lm_loss(token_logps(logits, batch["input_ids"]), scored)
    return loss, {"tokens/scored": float(scored.sum())}
