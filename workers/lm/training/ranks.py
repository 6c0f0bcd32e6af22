"""Entry points of the processes `distributed.launch` starts: torchrun's agent, and each rank it runs.

`python -m workers.lm.training.ranks agent PARENT_PID TORCHRUN_ARGS...` is torchrun itself
(`torch.distributed.run.main`), run after asking for SIGTERM when the launching task dies: the agent
turns that into stopping its ranks. `... rank SPEC BACKEND WORKER` is one rank: it joins the process
group, trains the request in `SPEC`, and (rank 0 only) reports progress and writes the result.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch.distributed as dist
from torch.distributed import run as torchrun

from ground.schemas import LMTrainingRequest
from workers.lm.training.distributed import Ranks, die_with_parent, report_line
from workers.lm.training.run import train_in_process


def agent(parent: int, args: list[str]) -> None:
    die_with_parent(signal.SIGTERM, parent)
    torchrun.main(args)


def rank(spec: Path, backend: str, worker: str) -> None:
    die_with_parent(signal.SIGKILL, os.getppid())  # the agent: it stops us itself unless it was killed
    request = LMTrainingRequest.model_validate_json(spec.read_text())
    ranks = Ranks.join(backend)
    try:
        train_in_process(request, report_line if ranks.is_main else lambda _: None, worker, ranks)
        # Leave together: a rank that tears its gloo pairs down while a peer still sends or gathers (rank 0 writing
        # the result) can be aborted in gloo's thread ("terminate called without an active exception"), and torchrun
        # then fails a run that trained. Seen twice in the FSDP test at teardown (once in CI on a loaded machine).
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    role, *rest = sys.argv[1:]
    if role == "agent":
        agent(int(rest[0]), rest[1:])
    else:
        rank(Path(rest[0]), rest[1], rest[2] if len(rest) > 2 else "")
