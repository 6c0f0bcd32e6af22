"""The language-model training loop, read top to bottom: schedule, step, accumulate, clip, log, checkpoint.

Method-specific parts (which tokens, which loss) come in through an `Objective`; everything else
(data order, learning rate, dropout seed, resume) is a pure function of the config and the step number,
so a run resumed from a checkpoint continues exactly where an uninterrupted one would be.

On several ranks (`distributed.Ranks`) each rank runs its shard of every global micro-batch; the
objective's losses are shares of the global mean (`sharded.py`), so N ranks take the same steps as one
process with the same `batch_size`. Rank 0 alone reports progress and writes checkpoints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import Tensor

from workers.lm.training.checkpoint import LOAD_ERRORS, restore_training_state, save_checkpoint
from workers.lm.training.data import bucketed_batches
from workers.lm.training.distributed import Ranks
from workers.lm.training.fsdp_state import FullState
from workers.lm.training.loop_config import LoopConfig
from workers.lm.training.sharded import zero_weighted

Progress = Callable[[dict[str, Any]], None]


class Objective(Protocol):
    """A method's data and loss: per-example lengths, a collated micro-batch, the global micro-batch's
    denominators (`totals`) and a shard's share of its loss and metrics (see `sharded.py`)."""

    lengths: list[int]

    def batch(self, indices: list[int]) -> dict[str, Tensor]: ...

    def totals(self, indices: list[int]) -> tuple[float, ...]: ...

    def loss(self, model: Any, batch: dict[str, Tensor], totals: tuple[float, ...]) -> tuple[
        Tensor, dict[str, float]]: ...


@dataclass
class LoopResult:
    steps: int
    final_loss: float
    losses: list[float]
    checkpoints: list[str]
    resumed_from_step: int
    tokens_per_s: float
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


class Schedule:
    """Which examples micro-batch k holds: epoch k // n, position k % n of that epoch's bucketed order."""

    def __init__(self, lengths: list[int], config: LoopConfig) -> None:
        self.lengths, self.config = lengths, config
        self.per_epoch = math.ceil(len(lengths) / config.batch_size)
        self._epochs: dict[int, list[list[int]]] = {}

    @property
    def total_steps(self) -> int:
        if self.config.max_steps:
            return self.config.max_steps
        return max(1, self.config.epochs * self.per_epoch // self.config.grad_accum_steps)

    def micro_batch(self, k: int) -> list[int]:
        epoch, position = divmod(k, self.per_epoch)
        if epoch not in self._epochs:
            self._epochs = {epoch: bucketed_batches(self.lengths, self.config.batch_size, self.config.bucket_factor,
                                                    self.config.seed, epoch)}
        return self._epochs[epoch][position]


def learning_rate(step: int, config: LoopConfig) -> float:
    """Linear warm-up to `learning_rate`, then constant (a function of the step: nothing to checkpoint)."""
    if config.warmup_steps and step <= config.warmup_steps:
        return config.learning_rate * step / config.warmup_steps
    return config.learning_rate


def step_seed(config: LoopConfig, step: int, ranks: Ranks) -> int:
    """Dropout's seed for `step` on this rank: a resumed rank draws what an uninterrupted one would."""
    return (config.seed * 1_000_003 + step) * ranks.world + ranks.rank


def train_loop(
    model: Any, tokenizer: Any, objective: Objective, config: LoopConfig, out_dir: Path, device: torch.device,
    autocast: AbstractContextManager[Any], lineage: dict[str, Any], progress: Progress, ranks: Ranks, *,
    resume: Path | None,
) -> LoopResult:
    """Train until `total_steps`, from checkpoint `resume` when given (else from step 0).

    `model` must already hold `resume`'s weights (`run.resumable_policy` chose it: the newest checkpoint that
    loads, which need not be the newest directory); every rank restores the same optimiser state from it.
    """
    started = time.perf_counter()
    schedule = Schedule(objective.lengths, config)
    total = schedule.total_steps
    wrapped = ranks.wrap(model, config.sharding)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    # Under FSDP, checkpoints gather the shards (every rank) and rank 0 writes them as one process would.
    whole = FullState(model, optimizer) if ranks.world > 1 and config.sharding == "fsdp" else None
    losses: list[float] = []
    checkpoints: list[str] = []
    start_step = 0
    if resume is not None:
        try:
            state = restore_training_state(resume, cast(torch.optim.Optimizer, whole or optimizer))
        except LOAD_ERRORS as error:  # its files passed `checkpoint_problem`; the model already holds its weights
            raise RuntimeError(f"checkpoint {resume} passed its file checks but its training state did not load "
                               f"({type(error).__name__}: {error}); move it aside to resume from the one "
                               "before") from error
        start_step, losses, checkpoints = state["step"], list(state["losses"]), list(state["checkpoints"])
    wrapped.train()
    tokens_seen, loss_value, metrics = 0, float("nan"), {}
    for step in range(start_step + 1, total + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        torch.manual_seed(step_seed(config, step, ranks))
        step_loss = torch.zeros((), device=device)
        step_tokens = torch.zeros((), device=device)
        step_metrics: dict[str, float] = {}
        for micro in range(config.grad_accum_steps):
            indices = schedule.micro_batch((step - 1) * config.grad_accum_steps + micro)
            shard, real = ranks.shard(indices)
            batch = {k: v.to(device, non_blocking=True) for k, v in objective.batch(shard).items()}
            with ranks.no_sync(wrapped, last=micro == config.grad_accum_steps - 1):
                with autocast:
                    loss, micro_metrics = objective.loss(wrapped, batch, objective.totals(indices))
                if not real:
                    loss, micro_metrics = zero_weighted(loss, micro_metrics)
                (loss * ranks.world / config.grad_accum_steps).backward()  # DDP averages over ranks: undo it
            step_loss += loss.detach().float() / config.grad_accum_steps
            if real:
                step_tokens += batch["attention_mask"].sum()
            for key, value in micro_metrics.items():
                step_metrics[key] = step_metrics.get(key, 0.0) + value / config.grad_accum_steps
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        keys = sorted(step_metrics)
        summed = ranks.sum(torch.stack([step_loss, step_tokens.float(),
                                        *(torch.tensor(step_metrics[k], device=device) for k in keys)]))
        values = summed.tolist()  # sync point: once per optimiser step
        loss_value, tokens_seen = values[0], tokens_seen + int(values[1])
        losses.append(loss_value)
        metrics = dict(zip(keys, values[2:], strict=True))
        elapsed = time.perf_counter() - started
        if ranks.is_main and (step % config.log_every == 0 or step == total):
            progress({"step": step, "of": total, "loss": round(loss_value, 6),
                      "tokens_per_s": round(tokens_seen / max(elapsed, 1e-9), 1),
                      "lr": learning_rate(step, config), **{k: round(v, 6) for k, v in metrics.items()}})
        if step % config.checkpoint_every == 0 or step == total:
            path = out_dir / f"checkpoint-{step:06d}"
            checkpoints.append(str(path))
            if whole is not None:
                whole.gather()
            if ranks.is_main:
                record = {"losses": losses, "checkpoints": checkpoints, "config": config.to_dict(), **lineage}
                save_checkpoint(out_dir, step, whole or model, tokenizer,
                                cast(torch.optim.Optimizer, whole or optimizer), record)
    seconds = time.perf_counter() - started
    return LoopResult(steps=total, final_loss=losses[-1] if losses else loss_value, losses=losses,
                      checkpoints=checkpoints, resumed_from_step=start_step,
                      tokens_per_s=tokens_seen / max(seconds, 1e-9), seconds=seconds, metrics=metrics)
