"""Checkpoints a run can resume from: model (Hugging Face dir), optimiser and RNG state, all without pickle.

Layout of `<run>/checkpoint-000050/`: the model's `save_pretrained` output (full weights, or the
LoRA adapter) and tokenizer, `optimizer.safetensors` + `optimizer.json` (tensors vs the rest),
`rng.safetensors`, and `state.json` (step, losses, resolved config). A checkpoint is written
under a `.partial` name and renamed when complete, so the newest directory is always loadable.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

PREFIX = "checkpoint-"
RESULT_FILE = "result.json"  # a finished run's result: its presence makes a run idempotent


def write_result(out_dir: Path, payload: dict[str, Any]) -> dict[str, Any]:
    """`payload` as the run's RESULT_FILE, written under a `.partial` name and renamed (a reader never sees half)."""
    partial = out_dir / (RESULT_FILE + ".partial")
    partial.write_text(json.dumps(payload, indent=2))
    partial.rename(out_dir / RESULT_FILE)
    return payload


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return out_dir / f"{PREFIX}{step:06d}"


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not out_dir.exists():
        return []
    found = [p for p in out_dir.iterdir()
             if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """The optimiser's state into checkpoint directory `path`: its tensors as safetensors, the rest as JSON."""
    tensors, meta = _optimizer_tensors(optimizer)
    save_file(tensors, str(path / "optimizer.safetensors"))
    (path / "optimizer.json").write_text(json.dumps(meta))


def restore_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    tensors = load_file(str(path / "optimizer.safetensors"))
    meta = json.loads((path / "optimizer.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    out_dir: Path, step: int, model: Any, tokenizer: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any],
) -> Path:
    """Write checkpoint `step` atomically (rename of a complete `.partial` directory); returns its path."""
    final = checkpoint_dir(out_dir, step)
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    save_optimizer(optimizer, partial)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(partial / "rng.safetensors"))
    python_rng = random.getstate()
    (partial / "state.json").write_text(json.dumps({**state, "step": step, "python_rng": [
        python_rng[0], list(python_rng[1]), python_rng[2]]}, indent=1))
    shutil.rmtree(final, ignore_errors=True)  # a half-deleted older copy of the same step
    partial.rename(final)
    return final


def restore_training_state(path: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load optimiser and RNG state from checkpoint `path` (the model is loaded by the caller); returns state.json."""
    restore_optimizer(optimizer, path)
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    cuda_states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    state: dict[str, Any] = json.loads((path / "state.json").read_text())
    version, internal, gauss = state.pop("python_rng")
    random.setstate((version, tuple(internal), gauss))
    return state
