"""One training task over several devices with PyTorch's own runtime: torchrun starts the ranks, DDP syncs them.

A `gpu`-queue task that owns N devices runs `launch`: it starts `torch.distributed.run` (torchrun's
elastic agent, standalone rendezvous on a free loopback port) with N ranks of `workers.lm.training.ranks`
and relays rank 0's progress lines to the task. Each rank holds a `Ranks`: which shard of every
global micro-batch is its own (`shard`), how its model is wrapped (`wrap`: DDP, or FSDP when
`sharding='fsdp'`), and the few collectives the loop needs. One process is the same code with
`Ranks.single`, whose collectives do nothing, so one rank and N ranks cannot drift apart.

Kills: the agent and each rank ask the kernel for a signal when their parent dies (`die_with_parent`),
so a SIGKILLed Celery worker takes its ranks with it and the redelivered task is the only writer of
the run directory; it resumes every rank from the newest checkpoint.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from ground.schemas import LMTrainingRequest

PROGRESS_MARK = "PROXYLOOP_PROGRESS "
# Ranks other than 0 wait at a barrier while rank 0 runs the DPO reference pass over the whole dataset,
# which can take far longer than a collective's default timeout (10 min on NCCL).
COLLECTIVE_TIMEOUT = timedelta(hours=2)
_PR_SET_PDEATHSIG = 1
log = logging.getLogger("proxyloop.workers.lm.distributed")


def world_size(device_type: str, gpus_per_worker: int, cpu_ranks: int) -> int:
    """Ranks one task runs: `gpus_per_worker` CUDA devices (0 = every visible one), or `cpu_ranks` on CPU."""
    if device_type != "cuda":
        return cpu_ranks
    visible = torch.cuda.device_count()
    if gpus_per_worker > visible:
        raise ValueError(f"PROXYLOOP_GPUS_PER_WORKER={gpus_per_worker} but this worker sees {visible} CUDA devices")
    return gpus_per_worker or visible


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank `rank` of `world`, its local device index `local`."""

    rank: int = 0
    world: int = 1
    local: int = 0

    @classmethod
    def single(cls) -> Ranks:
        return cls()

    @classmethod
    def join(cls, backend: str) -> Ranks:
        """Join the process group torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*) describes."""
        local = int(os.environ["LOCAL_RANK"])
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), local=local)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, chosen: torch.device) -> torch.device:
        """Rank r of a CUDA run uses visible device r; CPU ranks share the CPU."""
        if self.world == 1 or chosen.type != "cuda":
            return chosen
        if chosen.index is not None:
            raise ValueError(f"device {chosen} names one GPU, but the task runs {self.world} ranks: leave "
                             "config.device as 'cuda' (rank r takes device r) or set PROXYLOOP_GPUS_PER_WORKER=1")
        return torch.device("cuda", self.local)

    def shard(self, indices: list[int]) -> tuple[list[int], bool]:
        """This rank's contiguous share of a global micro-batch (sizes differ by at most one) and whether it is
        real. A rank left with nothing (a last batch smaller than the world) gets the first example back to run
        forward and backward on, weighted zero, because DDP needs every rank in every gradient all-reduce."""
        base, extra = divmod(len(indices), self.world)
        start = self.rank * base + min(self.rank, extra)
        mine = indices[start:start + base + (self.rank < extra)]
        return (mine, True) if mine else (indices[:1], False)

    def sum(self, values: Tensor) -> Tensor:
        """Element-wise sum over ranks (in place); the values themselves in one process."""
        if self.world > 1:
            dist.all_reduce(values)
        return values

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the body before the others do (it writes what they then read, e.g. the reference cache)."""
        if not self.is_main:
            dist.barrier()
        yield
        if self.is_main and self.world > 1:
            dist.barrier()

    def wrap(self, model: torch.nn.Module, sharding: str) -> torch.nn.Module:
        """DDP (a full replica per rank, gradients averaged) or FSDP2 (parameters, gradients and optimiser
        state sharded across ranks, each decoder layer gathered only while it runs); the model itself alone."""
        if self.world == 1:
            return model
        if sharding == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for layer in _decoder_layers(model):
                fully_shard(layer)
            fully_shard(model)
            return model
        ids = [self.local] if next(model.parameters()).device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def no_sync(self, wrapped: torch.nn.Module, last: bool) -> AbstractContextManager[Any]:
        """Skip DDP's gradient all-reduce on every accumulated micro-batch but the step's last one."""
        if last or not isinstance(wrapped, DistributedDataParallel):
            return contextlib.nullcontext()  # FSDP reduce-scatters every micro-batch: correct, if more traffic
        return wrapped.no_sync()


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a Hugging Face causal LM (`model.model.layers` for Llama-family models)."""
    found = [m for name, m in model.named_modules() if name.endswith(".layers") and isinstance(m, torch.nn.ModuleList)]
    return [layer for layers in found for layer in layers]


def die_with_parent(sig: signal.Signals, parent: int) -> None:
    """Ask Linux to send `sig` to this process when its parent dies; exit now if it already has."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig))
    if os.getppid() != parent:
        os._exit(1)


def launch(request: LMTrainingRequest, worker: str, ranks: int, backend: str,
           progress: Callable[[dict[str, Any]], None]) -> None:
    """Run `request` on `ranks` local processes under torchrun; returns when rank 0 has written the result.

    A failing rank fails the launch (no elastic restarts: the Celery redelivery is the retry). An exception
    from `progress` stops the agent, which stops its ranks, before it propagates.
    """
    out = Path(request.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "launch.json"
    spec.write_text(request.model_dump_json())
    command = [sys.executable, "-m", "workers.lm.training.ranks", "agent", str(os.getpid()),
               "--standalone", f"--nproc-per-node={ranks}", "--max-restarts=0",
               "-m", "workers.lm.training.ranks", "rank", str(spec), backend, worker]
    tail: deque[str] = deque(maxlen=60)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as agent:
        assert agent.stdout is not None
        try:
            for line in agent.stdout:
                if line.startswith(PROGRESS_MARK):
                    progress(json.loads(line[len(PROGRESS_MARK):]))
                else:
                    tail.append(line)
                    log.debug("torchrun: %s", line.rstrip())
        except BaseException:
            agent.terminate()  # torchrun's agent answers SIGTERM by stopping every rank
            agent.wait()
            raise
        code = agent.wait()
    if code != 0:
        raise RuntimeError(f"torchrun ({ranks} ranks) exited with {code}; its last output:\n{''.join(tail)}")


def report_line(meta: dict[str, Any]) -> None:
    """Rank 0's progress, as one marked stdout line that `launch` hands to the task."""
    print(PROGRESS_MARK + json.dumps(meta), flush=True)  # noqa: T201 - the channel to the launching task
