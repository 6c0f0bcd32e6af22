"""One mode-mixture run of `proxyloop.train_lm` (config `reading="mixture"`): the worker's body for paper 1's
mixture reading (policies/lm/mode_mixture.py), beside `training/run.py`'s loop for full-model and bottleneck DPO.

`mixture_stage` 'proxy' trains τ̃ and Θ̃ from a base model on the proxy pairs (stage 1); 'adapter' the adapter
alone from a mixture stage-1 checkpoint on the expert pairs (two_stage); 'all' τ̃, Θ̃ and the adapter from
that checkpoint on the expert pairs (fine_tune). The base runs once over the pairs (`encode_pairs`, on the
worker's device) and never moves; the DPO steps run on the CPU over those tensors, in one process.

A checkpoint `checkpoint-000020/` is a loadable policy: the base's Hugging Face files (hard links, a copy across
file systems: they never change), `mode_mixture.safetensors` + `.json`, and what only a resumed run reads:
`optimizer.safetensors` + `optimizer.json` (Adam) and `state.json` (step, losses, checkpoints), the names of
`training/checkpoint.py`, which a release drops. Each is written as `.partial` and renamed when complete. A
redelivered run resumes from the newest that loads (a damaged one is skipped with a warning, as in
`training/run.py`) and ends with the mixture an uninterrupted run ends with (`dpo`'s data order is replayed); a
finished run returns its `result.json`. As there, the output directory belongs to the run recorded in its
`run.json`: a request for another base, other pairs or another config (another `simplex_dim`) is refused rather
than resuming that run's mixture.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import torch
from safetensors.torch import load_file

from ground.schemas import LMTrainingRequest
from policies.lm.mode_mixture import (
    SPEC_FILE,
    WEIGHTS_FILE,
    ModeMixture,
    is_mixture_dir,
    load_mixture_dir,
    save_mixture_dir,
)
from policies.lm.release import TRAINING_ONLY
from workers.device import select_device
from workers.lm.mode_mixture_training import encode_pairs, train_adapter, train_fine_tune, train_proxy
from workers.lm.models import load_causal_lm, load_tokenizer
from workers.lm.plans import CHECKPOINTS_PER_RUN, MixtureRecipe, MixtureStage, reading_recipe
from workers.lm.training.checkpoint import (
    LOAD_ERRORS,
    MODEL_WEIGHTS,
    Layout,
    checkpoint_dir,
    claim_run_dir,
    latest_checkpoint,
    lm_identity,
    record_run,
    restore_optimizer,
    resumable_checkpoints,
    save_optimizer,
    skipped,
    write_result,
)
from workers.lm.training.data import load_jsonl
from workers.lm.training.loop import Progress

STATE_FILE = "state.json"
NOT_MODEL_FILES = TRAINING_ONLY | {WEIGHTS_FILE, SPEC_FILE}
# A resumable mixture checkpoint: the mixture, Adam and the step, and the base's weights that make it a policy.
MIXTURE_LAYOUT = Layout((STATE_FILE, "optimizer.safetensors", "optimizer.json", WEIGHTS_FILE, SPEC_FILE),
                        MODEL_WEIGHTS, ("step", "losses", "checkpoints"))


def is_mixture_request(request: LMTrainingRequest) -> bool:
    return request.config.get("reading") == "mixture"


def parse_mixture_config(values: dict[str, Any]) -> tuple[MixtureStage, MixtureRecipe]:
    """The stage and the recipe of a mixture request's config; unknown keys are an error, as for DPOConfig."""
    rest = dict(values)
    if rest.pop("reading", None) != "mixture":
        raise ValueError("a mode-mixture run needs config reading='mixture'")
    stage = rest.pop("mixture_stage", None)
    if stage not in get_args(MixtureStage):
        raise ValueError(f"mixture_stage must be one of {list(get_args(MixtureStage))}, got {stage!r}")
    recipe = reading_recipe("mixture", rest)
    assert isinstance(recipe, MixtureRecipe)
    if stage_epochs(stage, recipe) < 1 or recipe.batch_size < 1 or recipe.checkpoint_every < 0:
        raise ValueError("a mixture stage needs epochs and batch_size >= 1, checkpoint_every >= 0")
    return stage, recipe


def stage_epochs(stage: MixtureStage, recipe: MixtureRecipe) -> int:
    return {"proxy": recipe.proxy_epochs, "adapter": recipe.adapter_epochs, "all": recipe.fine_tune_epochs}[stage]


def _link_or_copy(source: str, target: str) -> str:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, target)
    return target


def link_model_files(source: Path, out: Path) -> None:
    """The base's Hugging Face files (model, config, tokenizer) from `source`, a base or mixture checkpoint."""
    shutil.copytree(source, out, copy_function=_link_or_copy, dirs_exist_ok=True,
                    ignore=lambda _, names: [n for n in names if n in NOT_MODEL_FILES])


@dataclass
class MixtureCheckpoints:
    """`DPOHooks` of a worker run: restore the newest checkpoint, report progress, checkpoint every N steps."""

    out: Path
    model_source: Path
    base_model: str
    recipe: MixtureRecipe
    progress: Progress
    record: dict[str, Any]
    started: float = field(default_factory=time.perf_counter)
    checkpoints: list[str] = field(default_factory=list)
    resumed_from_step: int = 0
    tokens: int = 0

    def restore(self, mixture: ModeMixture, optimiser: torch.optim.Optimizer) -> tuple[int, list[float]]:
        """Load the newest checkpoint that loads into `mixture` and `optimiser`; (0, []) without one. Each is read
        and checked whole before the mixture is set (Adam checks its groups before it sets anything), so one that
        fails, skipped with a warning, leaves both as they were for the next."""
        shapes = {key: tuple(value.shape) for key, value in mixture.state_dict().items()}
        for path in resumable_checkpoints(self.out, MIXTURE_LAYOUT):
            try:
                weights = load_file(str(path / WEIGHTS_FILE))
                found = {key: tuple(value.shape) for key, value in weights.items()}
                if found != shapes:
                    raise ValueError(f"its mixture has tensors {found}, this run's {shapes}")
                state = json.loads((path / STATE_FILE).read_text())
                step, losses, checkpoints = int(state["step"]), list(state["losses"]), list(state["checkpoints"])
                restore_optimizer(optimiser, path)
            except LOAD_ERRORS as error:
                skipped(path, f"{type(error).__name__}: {error}")
                continue
            mixture.load_state_dict(weights)
            self.checkpoints, self.resumed_from_step = checkpoints, step
            return step, losses
        return 0, []

    def after_step(self, mixture: ModeMixture, optimiser: torch.optim.Optimizer, step: int, total: int,
                   losses: list[float], tokens: int) -> None:
        self.tokens += tokens
        every = self.recipe.checkpoint_every or -(-total // CHECKPOINTS_PER_RUN)
        if step % max(1, every // 2) == 0 or step == total:
            self.progress({"step": step, "of": total, "loss": round(losses[-1], 6),
                           "tokens_per_s": round(self.tokens_per_s, 1)})
        if step % every == 0 or step == total:
            self.save(mixture, optimiser, step, losses)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(time.perf_counter() - self.started, 1e-9)

    def save(self, mixture: ModeMixture, optimiser: torch.optim.Optimizer, step: int, losses: list[float]) -> Path:
        final = checkpoint_dir(self.out, step)
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        link_model_files(self.model_source, partial)
        save_mixture_dir(mixture, partial, self.base_model, self.recipe.to_dict())
        save_optimizer(optimiser, partial)
        self.checkpoints = [*self.checkpoints, str(final)]
        (partial / STATE_FILE).write_text(json.dumps({**self.record, "step": step, "losses": losses,
                                                      "checkpoints": self.checkpoints}, indent=1))
        shutil.rmtree(final, ignore_errors=True)  # a half-deleted older copy of the same step
        partial.rename(final)
        return final


def _stage1_of(source: Path, stage: MixtureStage, recipe: MixtureRecipe) -> tuple[ModeMixture | None, str]:
    """The stage-1 mixture a later stage starts from (None for stage 1) and the base model it sits on."""
    if stage == "proxy":
        if is_mixture_dir(source):
            raise ValueError(f"{source} already holds a mode mixture; mixture stage 1 starts from a base model")
        return None, str(source)
    if not is_mixture_dir(source):
        raise ValueError(f"mixture_stage={stage!r} starts from a mixture stage-1 checkpoint and {source} holds none: "
                         "train mixture_stage='proxy' on the proxy pairs first")
    stage1, spec = load_mixture_dir(source)
    if stage1.simplex_dim != recipe.simplex_dim:
        raise ValueError(f"{source} holds a {stage1.simplex_dim}-mode mixture; simplex_dim={recipe.simplex_dim} "
                         "asks for another")
    return stage1, str(spec["base_model"])


def train_mixture(request: LMTrainingRequest, progress: Progress, worker: str) -> dict[str, Any]:
    """Train (or resume) one mixture stage; returns and stores (`result.json`) the run's record. `output_dir` must
    hold this run or nothing (`claim_run_dir`), checked before the base is encoded; a finished run returns its
    stored result."""
    started = time.perf_counter()
    out, source = Path(request.output_dir), Path(request.base_model)
    stage, recipe = parse_mixture_config(request.config)
    if request.method != "dpo":
        raise ValueError(f"the mode mixture trains with DPO; method {request.method!r} asks for another")
    identity = lm_identity(request)
    finished = claim_run_dir(out, identity)
    if finished is not None:
        return finished
    record_run(out, identity)
    stage1, base_model = _stage1_of(source, stage, recipe)
    device = select_device(None)
    model = load_causal_lm(source, device)
    encoded = encode_pairs(model, load_tokenizer(source), load_jsonl(request.dataset, ["prompt", "chosen", "rejected"]),
                           recipe.max_length)
    head = model.get_output_embeddings().weight.detach().float().cpu()
    del model  # the base's part is done: every step runs on the encoded tensors
    lineage: dict[str, Any] = {"run_id": request.run_id, "method": request.method, "base_model": request.base_model,
                               "dataset": request.dataset, "device": str(device), "ranks": 1, "reading": "mixture",
                               "mixture_stage": stage}
    if latest_checkpoint(out) is None:
        record_run(out, {**lineage, "config": request.config})
    hooks = MixtureCheckpoints(out, source, base_model, recipe, progress, {**lineage, "config": request.config})
    if stage1 is None:
        _, losses = train_proxy(encoded, head, recipe, hooks)
    elif stage == "adapter":
        _, losses = train_adapter(stage1, encoded, head, recipe, hooks)
    else:
        _, losses = train_fine_tune(stage1, encoded, head, recipe, hooks)
    seconds = time.perf_counter() - started
    steps = stage_epochs(stage, recipe) * -(-len(encoded) // recipe.batch_size)
    payload = {**lineage, "worker": worker, "steps": steps, "final_loss": losses[-1], "losses": losses,
               "checkpoints": hooks.checkpoints, "resumed_from_step": hooks.resumed_from_step,
               "tokens_per_s": hooks.tokens_per_s, "seconds": seconds, "metrics": {}, "seconds_this_attempt": seconds}
    return write_result(out, payload)
