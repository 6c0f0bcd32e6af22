"""One language-model training run from paths and a config dict: the body of `proxyloop.train_lm`.

Idempotent by run id: a finished run returns its stored `result.json`; an interrupted one resumes
from its newest checkpoint that loads (weights, optimiser, RNG, losses so far; a damaged newer one is skipped
with a warning rather than failing every redelivery). Reference log-probs are computed once per run, before the
first step, and cached as `reference_logps.safetensors` (recomputed from the base when that file is damaged);
pairs an earlier run scored with the same reference come from the shared cache (`reference_cache.py`) instead.
The output directory belongs to the run that first wrote it (`run.json`, `checkpoint.check_run_dir`): another
request sent there is refused before its result, checkpoints or reference log-probs are used. A request for
the mode-mixture reading (config `reading="mixture"`) is trained by `workers/lm/mixture_run.py`, with the same
idempotence, resume and result.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ground.schemas import LMTrainingRequest
from ground.settings import get_settings
from policies.lm.mode_mixture import sequence_cap
from policies.lm.simplex_bottleneck import attach_bottleneck, bottleneck_of, select_trainable
from workers.device import select_device
from workers.lm.mixture_run import is_mixture_request, train_mixture
from workers.lm.models import load_causal_lm, load_tokenizer
from workers.lm.training.checkpoint import (
    LOAD_ERRORS,
    RESULT_FILE,
    claim_run_dir,
    lm_identity,
    record_run,
    resumable_checkpoints,
    skipped,
    write_result,
)
from workers.lm.training.data import load_jsonl, tokenize_pairs
from workers.lm.training.distributed import Ranks, launch
from workers.lm.training.dpo_config import DPOConfig
from workers.lm.training.loop import Progress, train_loop
from workers.lm.training.loop_config import LoopConfig
from workers.lm.training.reference_cache import ReferenceCache, cached_reference_logps
from workers.lm.training.sft import chat_messages, choose_loss_mode, fit_chats
from workers.lm.training.sft_auto import train_auto_sft, wants_validation
from workers.lm.training.sft_config import SFTConfig
from workers.lm.training.sharded import ChatObjective, PairObjective

REFERENCE_FILE = "reference_logps.safetensors"
log = logging.getLogger("proxyloop.workers.lm")


def parse_config(method: str, values: dict[str, Any]) -> LoopConfig:
    return DPOConfig.from_dict(values) if method == "dpo" else SFTConfig.from_dict(values)


def autocast_for(device: torch.device, bf16: bool | None) -> AbstractContextManager[Any]:
    """bf16 autocast on CUDA by default (weights stay float32); plain float32 on CPU unless asked."""
    if bf16 if bf16 is not None else device.type == "cuda":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_policy(base_model: str, checkpoint: Path | None, config: LoopConfig, device: torch.device) -> Any:
    """The base model, wrapped with LoRA when `lora_r` > 0, holding `checkpoint`'s weights when given; with a
    simplex bottleneck when `simplex_dim` > 0 (stage 1) and only `train_parts` trainable (stage 2: the adapter)."""
    if not config.lora_r:
        model = load_causal_lm(checkpoint or base_model, device)
        existing = bottleneck_of(model)
        if config.simplex_dim and existing is None:
            attach_bottleneck(model, config.simplex_dim)
        elif config.simplex_dim and existing is not None and existing.simplex_dim != config.simplex_dim:
            raise ValueError(f"{base_model} already has a {existing.simplex_dim}-simplex bottleneck; "
                             f"simplex_dim={config.simplex_dim} asks for another")
        select_trainable(model, config.train_parts, adapter_frozen=config.simplex_dim > 0)
        return model
    from peft import LoraConfig, PeftModel, get_peft_model

    base = load_causal_lm(base_model, device)
    if checkpoint is not None:
        return PeftModel.from_pretrained(base, str(checkpoint), is_trainable=True)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.lora_target_modules), task_type="CAUSAL_LM")
    return get_peft_model(base, lora)


def resumable_policy(base_model: str, out: Path, config: LoopConfig, device: torch.device) -> tuple[Any, Path | None]:
    """The policy holding the newest checkpoint in `out` that loads, and that checkpoint; the fresh policy and None
    when none does. A checkpoint that fails its file checks or its load is skipped with a warning naming it, so a run
    whose newest checkpoint was damaged resumes from the one before instead of failing on every redelivery."""
    for checkpoint in resumable_checkpoints(out):
        try:
            return load_policy(base_model, checkpoint, config, device), checkpoint
        except LOAD_ERRORS as error:
            skipped(checkpoint, f"{type(error).__name__}: {error}")
    torch.manual_seed(config.seed)  # LoRA initialisation as an uninterrupted run's, whatever a failed load drew
    return load_policy(base_model, None, config, device), None


def _stored_reference(cache: Path, n_pairs: int) -> tuple[Tensor, Tensor] | None:
    """The run's cached reference log-probs; None when absent, or (with a warning) when the file does not load or
    does not hold one value per pair: recomputing costs one pass, a crash would cost every redelivery."""
    if not cache.exists():
        return None
    try:
        stored = load_file(str(cache))
        chosen, rejected = stored["chosen"], stored["rejected"]
    except LOAD_ERRORS as error:
        log.warning("%s does not load (%s: %s): recomputed", cache, type(error).__name__, error)
        return None
    if chosen.shape != (n_pairs,) or rejected.shape != (n_pairs,):
        log.warning("%s holds %s values for %d pairs: recomputed", cache, tuple(chosen.shape), n_pairs)
        return None
    return chosen, rejected


def _reference(reference_model: Callable[[], Any], pairs: list[Any], config: DPOConfig, pad: int,
               device: torch.device, autocast: AbstractContextManager[Any], out: Path) -> tuple[Tensor, Tensor]:
    """The run's reference log-probs: its cache when that loads, else computed on `reference_model()` (the policy
    before its first step; on a resume, a fresh load of the base, since the policy then holds trained weights)."""
    cache = out / REFERENCE_FILE
    stored = _stored_reference(cache, len(pairs))
    if stored is not None:
        return stored
    shared = ReferenceCache(get_settings().resolved_reference_cache_dir)  # across runs: only unseen pairs computed
    model = reference_model()
    disable = model.disable_adapter() if config.lora_r else contextlib.nullcontext()  # LoRA: base = reference
    with disable:
        chosen, rejected = cached_reference_logps(model, pairs, config, pad, device, autocast, shared)
    partial = out / (REFERENCE_FILE + ".partial")
    save_file({"chosen": chosen.contiguous(), "rejected": rejected.contiguous()}, str(partial))
    partial.rename(cache)
    return chosen, rejected


def run_lm_training(request: LMTrainingRequest, progress: Progress, worker: str = "", ranks: int = 1) -> dict[str, Any]:
    """Train (or resume, or return the finished result of) `request.run_id` on `ranks` processes.

    One rank trains in this process; more are started by torchrun (`distributed.launch`), each on its
    own device (or sharing the CPU, with gloo), rank 0 reporting progress and writing the result. A mixture run
    trains in this process whatever `ranks` says: its steps are on a few small tensors.

    Before anything in `output_dir` is used, the request is compared with the run recorded there (ForeignRunError
    when it is another); a valid config is then recorded as this run's, so a bad one can be corrected and resent.
    """
    if is_mixture_request(request):  # validates its config, then claims and records its directory itself
        return train_mixture(request, progress, worker)
    out = Path(request.output_dir)
    result_path = out / RESULT_FILE
    identity = lm_identity(request)
    finished = claim_run_dir(out, identity)
    if finished is not None:
        return finished
    config = parse_config(request.method, request.config)  # a bad config fails here, before any rank starts
    record_run(out, identity)
    if wants_validation(request):  # IM and IT both trained, through this function, and compared on held-out chats
        return train_auto_sft(request, progress, worker, ranks, run_lm_training)
    if ranks == 1:
        return train_in_process(request, progress, worker, Ranks.single())
    backend = "nccl" if select_device(config.device or None).type == "cuda" else "gloo"
    launch(request, worker, ranks, backend, progress)
    return dict(json.loads(result_path.read_text()))


def train_in_process(request: LMTrainingRequest, progress: Progress, worker: str, ranks: Ranks) -> dict[str, Any]:
    """This process's part of the run: all of it on one rank, its shards of every batch on several."""
    out = Path(request.output_dir)
    started = time.perf_counter()
    config = parse_config(request.method, request.config)
    device = ranks.device(select_device(config.device or None))
    autocast = autocast_for(device, config.bf16)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)  # LoRA initialisation; restored RNG state takes over on resume
    tokenizer = load_tokenizer(request.base_model)
    model, resume = resumable_policy(request.base_model, out, config, device)
    pad = int(tokenizer.pad_token_id)
    lineage: dict[str, Any] = {"run_id": request.run_id, "method": request.method, "base_model": request.base_model,
                               "dataset": request.dataset, "device": str(device), "ranks": ranks.world}
    objective: PairObjective | ChatObjective
    if isinstance(config, DPOConfig):
        # Pairs read at the run's cap: past its context a model with a position table fails (GPT-2 with 64 positions
        # under the default 512 was an IndexError) and one with rotary positions reads positions it never trained on.
        config = replace(config, max_length=sequence_cap(model, config.max_length))
        pairs = tokenize_pairs(load_jsonl(request.dataset, ["prompt", "chosen", "rejected"]), tokenizer)

        def reference_model() -> Any:  # only called when the run's reference cache is missing or damaged
            if resume is None:
                return model
            torch.manual_seed(config.seed)  # drawn before the restored RNG state takes over
            return load_policy(request.base_model, None, config, device)

        with ranks.main_first():  # rank 0 computes and stores the reference log-probs; the others read them
            reference = _reference(reference_model, pairs, config, pad, device, autocast, out)
        objective = PairObjective(pairs, reference, config, pad)
        lineage["logp_reduction"] = config.reduction
    else:
        assert isinstance(config, SFTConfig)
        chats = chat_messages(load_jsonl(request.dataset, ["messages"]))  # a malformed row fails here, by its line
        choice = choose_loss_mode(chats, tokenizer, config)
        fitted = fit_chats(chats, tokenizer, choice.mode, model, config.max_length)  # cut to the model's context
        objective = ChatObjective(fitted, config, pad, sequence_cap(model, config.max_length))
        lineage["loss_mode"] = {**asdict(choice), "length_ratio": choice.length_ratio}
        lineage["chats_without_output"] = len(chats) - len(fitted)  # left out: their output lies past the cap
    if resume is None and ranks.is_main:
        record_run(out, {**lineage, "config": config.to_dict()})
    result = train_loop(model, tokenizer, objective, config, out, device, autocast, lineage, progress, ranks,
                        resume=resume)
    payload = {**lineage, "worker": worker, **asdict(result), "seconds_this_attempt": time.perf_counter() - started}
    return write_result(out, payload) if ranks.is_main else payload
