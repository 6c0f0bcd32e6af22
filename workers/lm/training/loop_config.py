"""Settings shared by every language-model training method: optimiser, batching, checkpoints, LoRA.

Method configs (`DPOConfig`, `SFTConfig`) extend this one, as TRL's configs extend
`TrainingArguments`. Each field carries its help text; cross-field checks live in `__post_init__`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Self

from policies.lm.simplex_bottleneck import TRAIN_PARTS

SHARDINGS = ("ddp", "fsdp")


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class LoopConfig:
    learning_rate: float = _help("AdamW learning rate (paper 2 used 5e-6 to 1e-5 on 1B+ models).", 1e-5)
    weight_decay: float = _help("AdamW weight decay.", 0.0)
    warmup_steps: int = _help("Linear learning-rate warm-up, in optimiser steps.", 0)
    max_grad_norm: float = _help("Gradient clipping norm; 0 disables clipping.", 1.0)
    batch_size: int = _help("Examples (pairs for DPO) per micro-batch.", 8)
    grad_accum_steps: int = _help("Micro-batches accumulated per optimiser step.", 1)
    max_steps: int = _help("Optimiser steps; 0 means `epochs` passes over the data.", 0)
    epochs: int = _help("Passes over the data when `max_steps` is 0.", 1)
    max_length: int = _help("Tokens per sequence; longer sequences keep their start.", 512)
    bucket_factor: int = _help("Length bucketing: sort within windows of this many micro-batches.", 8)
    checkpoint_every: int = _help("Checkpoint (model, optimiser, RNG) every N optimiser steps.", 50)
    log_every: int = _help("Report progress every N optimiser steps.", 1)
    seed: int = _help("Seeds initialisation, data order and dropout; a resumed run continues the same stream.", 0)
    device: str = _help("'cpu', 'cuda', 'cuda:1'; empty picks CUDA when present.", "")
    bf16: bool | None = _help("bf16 autocast; None means on for CUDA, off for CPU (which runs fp32).", None)
    sharding: str = _help(
        "How a task on several ranks (PROXYLOOP_GPUS_PER_WORKER) splits the model: 'ddp' keeps a full replica per "
        "device and averages gradients; 'fsdp' (torch FSDP2) shards weights, gradients and optimiser state across "
        "the devices, for a model whose training state does not fit one. One rank ignores it.", "ddp")
    lora_r: int = _help("LoRA rank via peft; 0 trains every weight.", 0)
    lora_alpha: int = _help("LoRA scaling numerator.", 16)
    lora_dropout: float = _help("LoRA dropout.", 0.0)
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "Module names LoRA wraps (Llama-family names; GPT-2 uses 'c_attn')."},
    )
    simplex_dim: int = _help(
        "Paper 1's stage 1: give the model a D-simplex bottleneck before its LM head (policies.lm.simplex_bottleneck) "
        "and train it with the rest, its adapter held at the identity; 0 adds none. A model that already has one keeps "
        "it.", 0)
    train_parts: str = _help(
        "'all' trains every weight; 'bottleneck' only the simplex bottleneck's projection and Θ̃ (stage 1 with the "
        "body frozen); 'adapter' only the bottleneck's D×D adapter (paper 1's stage 2, expert pairs).", "all")

    def __post_init__(self) -> None:
        positive = ("batch_size", "grad_accum_steps", "epochs", "max_length", "bucket_factor", "checkpoint_every",
                    "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "lora_r", "max_grad_norm", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_r and not self.lora_target_modules:
            raise ValueError("lora_r > 0 needs lora_target_modules (e.g. ['q_proj', 'v_proj'])")
        if self.simplex_dim < 0 or self.simplex_dim == 1:
            raise ValueError(f"simplex_dim must be 0 (none) or >= 2, got {self.simplex_dim}")
        if self.sharding not in SHARDINGS:
            raise ValueError(f"sharding must be one of {list(SHARDINGS)}, got {self.sharding!r}")
        if self.train_parts not in TRAIN_PARTS:
            raise ValueError(f"train_parts must be one of {list(TRAIN_PARTS)}, got {self.train_parts!r}")
        if self.simplex_dim and self.train_parts == "adapter":
            raise ValueError("simplex_dim > 0 is stage 1 (the adapter stays the identity); train_parts='adapter' is "
                             "stage 2, started from the stage-1 checkpoint with simplex_dim=0")
        if self.lora_r and (self.simplex_dim or self.train_parts != "all"):
            raise ValueError("LoRA and the simplex bottleneck do not combine yet: set lora_r=0 for two-stage training")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Self:
        """Build from a task's config dict; unknown keys are an error, not silently ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
