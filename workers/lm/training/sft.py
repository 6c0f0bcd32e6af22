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
    why = [f"ratio {ratio:.2f} < {min_ratio}"] if not long_instructions else []
    why += [f"{n} examples > {max_n}"] if not few_examples else []
    return LossModeChoice("it", f"IT: {' and '.join(why)} (outside the IM region)", instruction, output, n)


def sft_batch_loss(model: Any, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Mean NLL over the scored tokens of a micro-batch (ids, attention_mask, loss_mask: [B, T])."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    scored = batch["loss_mask"][:, 1:]  # position t predicts token t+1
    loss = lm_loss(token_logps(logits, batch["input_ids"]), scored)
    return loss, {"tokens/scored": float(scored.sum())}
