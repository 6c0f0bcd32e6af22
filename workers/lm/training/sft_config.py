"""Configuration of supervised fine-tuning with Instruction Modelling (IM) or instruction tuning (IT)."""

from __future__ import annotations

from dataclasses import dataclass

from workers.lm.training.loop_config import LoopConfig, _help

LOSS_MODES = ("auto", "im", "it")


@dataclass
class SFTConfig(LoopConfig):
    loss_mode: str = _help(
        "'im' scores instruction, prompt and output tokens (paper 4), 'it' the output only, 'auto' trains both and "
        "keeps the one with the lower output loss on validation chats (`sft_auto`), recording why.",
        "auto",
    )
    validation_dataset: str = _help(
        "auto: a JSONL of held-out chats to compare IM and IT on; empty holds out `validation_share` of the "
        "dataset.", "")
    validation_share: float = _help("auto, without validation_dataset: share of the chats held out to compare on.", 0.2)
    im_min_length_ratio: float | None = _help(
        "auto on a dataset too small to hold chats out: IM only when instruction tokens / output tokens over the "
        "dataset is at least this. None takes the measured default `sft.AUTO_IM_MIN_LENGTH_RATIO` (today none: "
        "that rule never picks IM, see docs/benchmarks.md).",
        None,
    )
    im_max_examples: int | None = _help(
        "auto on a dataset too small to hold chats out: IM only when the dataset has at most this many examples. "
        "None takes `sft.AUTO_IM_MAX_EXAMPLES` (today no cap).", None)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_mode not in LOSS_MODES:
            raise ValueError(f"Unknown loss mode {self.loss_mode!r}; should be one of {list(LOSS_MODES)}")
        if self.im_min_length_ratio is not None and self.im_min_length_ratio < 0:
            raise ValueError(f"im_min_length_ratio must be >= 0, got {self.im_min_length_ratio}")
        if not 0 < self.validation_share < 1:
            raise ValueError(f"validation_share must be in (0, 1), got {self.validation_share}")
        if self.im_max_examples is not None and self.im_max_examples < 1:
            raise ValueError(f"im_max_examples must be >= 1, got {self.im_max_examples}")
