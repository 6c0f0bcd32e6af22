"""FSDP checkpoints in the layout every other run uses, so resume, evaluation and release read them unchanged.

Under FSDP (`sharding='fsdp'`) each rank holds a shard of every weight and of its optimiser state, so
neither `model.save_pretrained` nor `optimizer.state_dict()` on rank 0 sees the whole. `FullState`
gathers both to rank 0 (a collective: every rank calls `gather`) with torch's
`torch.distributed.checkpoint.state_dict` API, and hands `save_checkpoint` / `restore_training_state`
stand-ins that speak a plain optimiser's index-keyed state: FSDP's full optimiser state is keyed by
parameter name. Restoring scatters the full state back to the shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)


class FullState:
    """A sharded model and its optimiser, seen whole: `weights` and `state_dict()` after `gather()`."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]  # the optimiser's order
        self.weights: dict[str, Any] = {}
        self.optimizer_state: dict[str, Any] = {}

    def gather(self) -> None:
        """Every rank: collect full weights and optimiser state (on CPU) for rank 0 to write."""
        self.weights = get_model_state_dict(self.model, options=GATHER)
        self.optimizer_state = dict(get_optimizer_state_dict(self.model, self.optimizer, options=GATHER))

    def save_pretrained(self, path: Path) -> None:
        """What `save_checkpoint` calls on a model: the Hugging Face directory, from the gathered weights."""
        self.model.save_pretrained(path, state_dict=self.weights)  # type: ignore[operator]

    def state_dict(self) -> dict[str, Any]:
        """The gathered optimiser state keyed by parameter index, as `optimizer.state_dict()` is."""
        index = {name: i for i, name in enumerate(self.names)}
        groups = [{**g, "params": [index[n] for n in g["params"]]} for g in self.optimizer_state["param_groups"]]
        return {"state": {index[n]: s for n, s in self.optimizer_state["state"].items()}, "param_groups": groups}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Every rank: scatter an index-keyed full optimiser state (a checkpoint's) into this rank's shards."""
        groups = [{**g, "params": [self.names[i] for i in g["params"]]} for g in state["param_groups"]]
        named: dict[str, Any] = {"state": {self.names[int(i)]: s for i, s in state["state"].items()},
                                 "param_groups": groups}
        set_optimizer_state_dict(self.model, self.optimizer, named, options=StateDictOptions(full_state_dict=True))
