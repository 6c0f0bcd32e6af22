"""Configuration of direct preference training (DPO / IPO / hinge), one dataclass as in TRL."""

from __future__ import annotations

from dataclasses import dataclass

from workers.lm.training.chunked_logps import DEFAULT_CHUNK_TOKENS
from workers.lm.training.loop_config import LoopConfig, _help
from workers.lm.training.objectives import LOSS_TYPES, PAPER_REDUCTION, Reduction, check_loss_type


@dataclass
class DPOConfig(LoopConfig):
    loss_type: str = _help(f"One of {list(LOSS_TYPES)}.", "sigmoid")
    beta: float = _help("β of DPO and hinge; τ of IPO. Larger keeps the policy nearer the reference.", 0.1)
    logp_reduction: str = _help(
        "How token log-probs make a sequence log-prob: 'sum', 'mean', or 'auto' (paper 2: sum for "
        "sigmoid/IPO, mean for hinge). TRL uses sum for sigmoid/hinge and mean for IPO.",
        "auto",
    )
    nll_weight: float = _help("Weight of the NLL on chosen tokens added to the loss; 0 disables it.", 0.0)
    logps_chunk_tokens: int = _help(
        "Scored positions per LM-head chunk when computing log-probs (workers/lm/training/chunked_logps.py): "
        "full-vocabulary logits are then never kept for backward, only one chunk's at a time. 0 runs the plain "
        "forward; models the chunked path does not recognise (and DDP/FSDP ranks) run it anyway.",
        DEFAULT_CHUNK_TOKENS)
    share_prompts: bool = _help(
        "Run each pair's prompt once for both responses ([prompt | chosen | rejected] in one row, "
        "workers/lm/training/shared_prefix.py): the same log-probs and gradients for fewer tokens. Models and "
        "batches it cannot run exactly (and DDP/FSDP ranks) take the usual [chosen; rejected] rows anyway.",
        True)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_loss_type(self.loss_type)
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta} (IPO divides by it)")
        if self.logp_reduction not in ("auto", "sum", "mean"):
            raise ValueError(f"logp_reduction must be 'auto', 'sum' or 'mean', got {self.logp_reduction!r}")
        if self.nll_weight < 0:
            raise ValueError(f"nll_weight must be >= 0, got {self.nll_weight}")
        if self.logps_chunk_tokens < 0:
            raise ValueError(f"logps_chunk_tokens must be >= 0 (0: no chunking), got {self.logps_chunk_tokens}")

    @property
    def reduction(self) -> Reduction:
        if self.logp_reduction == "auto":
            return PAPER_REDUCTION[self.loss_type]
        return "sum" if self.logp_reduction == "sum" else "mean"
