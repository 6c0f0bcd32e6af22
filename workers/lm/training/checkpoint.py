"""Checkpoints a run can resume from: model (Hugging Face dir), optimiser and RNG state, all without pickle; and
the run's record of what it is, so that an output directory is only ever resumed by the run that made it.

Layout of `<run>/checkpoint-000050/`: the model's `save_pretrained` output (full weights, or the
LoRA adapter) and tokenizer, `optimizer.safetensors` + `optimizer.json` (tensors vs the rest),
`rng.safetensors`, and `state.json` (step, losses, resolved config). A checkpoint is written
under a `.partial` name and renamed when complete, so the newest directory is normally loadable; a disk that
filled up, a copy cut short or a hand edit can still damage one, so a resume checks each file it will read
and falls back to the newest checkpoint that passes (`resumable_checkpoints`), never crashing every
redelivery on one damaged directory.

`run.json` records what a run is (run id, base model, dataset path and content hash, the request's config but
for how long it runs) from its first attempt on. A Celery redelivery sends the same request, so it matches and
resumes; another request sent to the same directory would otherwise return another run's result, resume another
model's checkpoint or reuse another dataset's reference log-probs, so it is refused (`check_run_dir`), naming
what differs. Nothing is deleted: the directory may be the only copy of the other run.
"""

from __future__ import annotations

import fcntl
import json
import logging
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ground.schemas import LMTrainingRequest
from policies.lm.model_digest import file_sha256

PREFIX = "checkpoint-"
RESULT_FILE = "result.json"  # a finished run's result: its presence makes a run idempotent
RUN_FILE = "run.json"  # what the run is: compared with every request before its files are used
LOCK_FILE = ".run.lock"  # held by the delivery training the run (`run_dir_lock`)
# What reading a damaged file raises: a checkpoint (or cache) that fails with one of these is skipped, not fatal.
LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError)
log = logging.getLogger("proxyloop.workers.lm")


def write_json(path: Path, payload: Any) -> None:
    """`payload` as JSON at `path`, written under a `.partial` name and renamed: a reader never sees half a file,
    and a worker killed mid-write leaves the previous version (or none) behind."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=2))
    partial.rename(path)


def write_result(out_dir: Path, payload: dict[str, Any]) -> dict[str, Any]:
    """`payload` as the run's RESULT_FILE, written atomically (`write_json`)."""
    write_json(out_dir / RESULT_FILE, payload)
    return payload


def read_record(path: Path, warn: bool = True) -> dict[str, Any] | None:
    """The JSON object at `path`; None when absent, and None with a warning when it does not decode (a file torn
    by an older non-atomic writer): the caller then acts as if it were absent instead of failing every retry."""
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        if warn:
            log.warning("%s is unreadable (%s): treated as absent", path, error)
        return None
    if not isinstance(value, dict):
        if warn:
            log.warning("%s holds no JSON object: treated as absent", path)
        return None
    return value


# What a run is, and refusing the files of another.


class ForeignRunError(RuntimeError):
    """An output directory holds another run's files: resuming or returning them would be silently wrong."""


def dataset_sha256(path: str | Path) -> str | None:
    """Content hash of a dataset file (None when it is not there: nothing to compare). A content hash, not size
    and mtime, because the flow may export the same snapshot again before a retry."""
    try:
        return file_sha256(Path(path))
    except OSError:
        return None


# Config keys that only say how far a run goes and how often it saves or reports: the data order, learning rate
# and dropout are functions of the step, so a run continued to more steps (or epochs) is the same run, its first
# steps unchanged, and it may resume from the shorter run's checkpoints.
LENGTH_KEYS = frozenset({"max_steps", "epochs", "proxy_epochs", "adapter_epochs", "fine_tune_epochs", "expert_epochs",
                         "checkpoint_every", "log_every"})


def lm_identity(request: LMTrainingRequest) -> dict[str, Any]:
    """What makes two `proxyloop.train_lm` requests the same run: everything but the output directory and the
    LENGTH_KEYS of the config. The config is the request's own (a redelivery sends it byte for byte), not the
    resolved one, so a changed default in a newer worker does not refuse a run it resumes."""
    config = {key: value for key, value in request.config.items() if key not in LENGTH_KEYS}
    identity = {"run_id": request.run_id, "method": request.method, "base_model": request.base_model,
                "dataset": request.dataset, "dataset_sha256": dataset_sha256(request.dataset), "request_config": config}
    return dict(json.loads(json.dumps(identity)))  # as it reads back from run.json (tuples → lists)


def _config_differences(held: dict[str, Any], asked: dict[str, Any], keys: Any) -> list[str]:
    missing = "(unset)"
    return [f"config {key}={held.get(key, missing)!r} there, {asked.get(key, missing)!r} asked"
            for key in sorted(keys) if held.get(key, missing) != asked.get(key, missing)]


def _differences(recorded: dict[str, Any], identity: dict[str, Any]) -> list[str]:
    """Where `recorded` (a run.json, result.json or state.json) disagrees with `identity`; a key a record lacks is
    not compared (records written before a key existed, and result/state files hold only some)."""
    found = []
    for key, asked in identity.items():
        held = recorded.get(key)
        if key not in recorded or (key == "dataset_sha256" and (held is None or asked is None)):
            continue
        if key == "request_config" and isinstance(held, dict) and isinstance(asked, dict):
            found += _config_differences(held, asked, held.keys() | asked.keys())
        elif held != asked:
            shown = (str(held)[:12], str(asked)[:12]) if key == "dataset_sha256" else (held, asked)  # enough to tell
            found.append(f"{key} {shown[0]!r} there, {shown[1]!r} asked")
    config, asked_config = recorded.get("config"), identity.get("request_config")
    if "request_config" not in recorded and isinstance(config, dict) and isinstance(asked_config, dict):
        # Older records keep the resolved config only: compare the keys the request sets.
        found += _config_differences(config, asked_config, asked_config.keys() & config.keys())
    return found


def check_run_dir(out_dir: Path, identity: dict[str, Any]) -> None:
    """Raise ForeignRunError when `out_dir`'s run.json, result.json or a checkpoint's state.json says it holds
    another run than `identity`; a directory holding none of them, or this run's, passes."""
    records = [out_dir / RUN_FILE, out_dir / RESULT_FILE, *(p / "state.json" for p in list_checkpoints(out_dir))]
    for path in records:
        recorded = read_record(path, warn=False)  # a torn one is warned about where it is used
        found = _differences(recorded, identity) if recorded is not None else []
        if found:
            raise ForeignRunError(
                f"{out_dir} holds another run's files ({path.relative_to(out_dir)}: {'; '.join(found)}); run "
                f"{identity.get('run_id')!r} will not return, resume or reuse them. Give it its own output_dir, "
                f"or move {out_dir} aside if that run is no longer wanted")


def claim_run_dir(out_dir: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """`check_run_dir`, then the run's stored result when it already finished (None otherwise, a torn one
    included: that run is resumed from its last checkpoint instead)."""
    check_run_dir(out_dir, identity)
    return read_record(out_dir / RESULT_FILE)


@contextmanager
def run_dir_lock(out_dir: Path) -> Iterator[None]:
    """Hold `out_dir` for one delivery of its training task at a time. A second delivery (a visibility-timeout
    redelivery, a dispatch retry, a resend) waits here, then finds the first one's result (`claim_run_dir`) instead
    of training beside it into the same files: the audit had two workers train one run at once, and `result.json`
    and the result backend named different workers. An flock: released when the holder exits, also when killed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / LOCK_FILE, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("%s: another delivery of this run is training it; waiting for it to finish", out_dir)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def record_run(out_dir: Path, fields: dict[str, Any]) -> None:
    """Merge `fields` into `out_dir`'s run.json (created with the directory): the first attempt of a run records
    what it is, later ones add what they learn (device, loss mode) without losing it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / RUN_FILE, {**(read_record(out_dir / RUN_FILE) or {}), **fields})


# Checkpoints.


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


@dataclass(frozen=True)
class Layout:
    """What a resumable checkpoint of one kind holds: files it needs, weight files of which one must be there,
    and the keys its state.json needs."""

    required: tuple[str, ...]
    weights: tuple[str, ...]
    state_keys: tuple[str, ...]


MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
LM_LAYOUT = Layout(("state.json", "optimizer.safetensors", "optimizer.json", "rng.safetensors"),
                   (*MODEL_WEIGHTS, "adapter_model.safetensors"), ("step", "losses", "checkpoints", "python_rng"))


def checkpoint_problem(path: Path, layout: Layout) -> str | None:
    """Why checkpoint `path` cannot be resumed from, or None. Every safetensors file's header is checked against
    its size (what a truncated file fails) and every JSON file decoded: cheap next to loading, and they are the
    ways a checkpoint gets damaged outside our atomic renames."""
    missing = [name for name in layout.required if not (path / name).is_file()]
    if layout.weights and not any((path / name).is_file() for name in layout.weights):
        missing.append(" or ".join(layout.weights))
    if missing:
        return f"missing {', '.join(missing)}"
    decoded: dict[str, Any] = {}  # every JSON file, read once
    for file in sorted(path.iterdir()):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), "pt"):
                    pass
            elif file.suffix == ".json":
                decoded[file.name] = json.loads(file.read_text())
        except LOAD_ERRORS as error:
            return f"{file.name} does not load ({type(error).__name__}: {error})"
    index = decoded.get(MODEL_WEIGHTS[1], {})
    shards = set(index.get("weight_map", {}).values()) if isinstance(index, dict) else set()
    if absent := sorted(name for name in shards if not (path / name).is_file()):
        return f"missing {', '.join(absent)}"
    state, optimizer = decoded["state.json"], decoded["optimizer.json"]
    lacking = [f"state.json {key}" for key in layout.state_keys if not isinstance(state, dict) or key not in state]
    lacking += [f"optimizer.json {key}" for key in ("param_groups", "scalars")
                if not isinstance(optimizer, dict) or key not in optimizer]
    return f"lacks {', '.join(lacking)}" if lacking else None


def skipped(path: Path, why: object) -> None:
    log.warning("checkpoint %s cannot be resumed from (%s): skipped; the newest one that loads, or a fresh start, "
                "takes over", path, why)


def resumable_checkpoints(out_dir: Path, layout: Layout = LM_LAYOUT) -> Iterator[Path]:
    """Checkpoints newest first, those that fail `checkpoint_problem` skipped with a warning naming them and why."""
    for path in reversed(list_checkpoints(out_dir)):
        problem = checkpoint_problem(path, layout)
        if problem is None:
            yield path
        else:
            skipped(path, problem)


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
