"""`loss_mode="auto"`: Instruction Modelling or instruction tuning, decided per dataset on held-out chats (paper 4).

`bench/im_vs_it.py` swept the instruction/output length ratio (0.53-90) × training-set size (16-256) × seeds and
found no boundary of the kind paper 4 states: IM wins at ratio 28.5 with 64 and 256 examples but loses at 90 and
at 16, so the best "IM iff ratio ≥ R and n ≤ N" rule on the tuning seeds is "never IM" and agrees with 10 of 12
reporting cells. Which mask wins is a property of the dataset the ratio does not capture, and it shows on held-out
chats: the mask with the lower early-stopped validation output loss agreed with the test verdict in 12 of 12
reporting cells and 59 of 60 datasets (docs/benchmarks.md, full run of 2026-11-30).
So auto trains both masks on the same chats (the same seed, order and steps), scores every checkpoint's output
loss on validation chats, and keeps the best checkpoint of the better mask. Validation chats are the config's
`validation_dataset` or else a `validation_share` of the dataset, held out by seed. It costs twice a forced
mode's training; a dataset too small to hold chats out is decided by the static rule (`sft.auto_choice`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ground.schemas import LMTrainingRequest
from policies.lm.mode_mixture import sequence_cap
from workers.lm.models import load_causal_lm, load_tokenizer
from workers.lm.snapshot_data import write_jsonl
from workers.lm.training.checkpoint import PREFIX, write_result
from workers.lm.training.data import DatasetError, collate_chats, load_jsonl
from workers.lm.training.loop import Progress
from workers.lm.training.sft import LossMode, cap_words, chat_messages, choose_loss_mode, render_chat
from workers.lm.training.sft_config import SFTConfig

Chat = Sequence[dict[str, str]]
Run = Callable[[LMTrainingRequest, Progress, str, int], dict[str, Any]]
MODES: tuple[LossMode, LossMode] = ("im", "it")
MIN_VALIDATION_CHATS = 4  # fewer and one chat's loss decides
MIN_TRAINING_CHATS = 8  # what must remain to train on after holding chats out


def wants_validation(request: LMTrainingRequest) -> bool:
    return request.method == "sft" and request.config.get("loss_mode", "auto") == "auto"


def validation_split(chats: list[Chat], config: SFTConfig) -> tuple[list[Chat], list[Chat]] | None:
    """(training chats, validation chats), or None when the dataset is too small to hold any out."""
    if config.validation_dataset:
        return chats, chat_messages(load_jsonl(config.validation_dataset, ["messages"]))
    count = max(MIN_VALIDATION_CHATS, math.ceil(config.validation_share * len(chats)))
    if len(chats) - count < MIN_TRAINING_CHATS:
        return None
    order = random.Random(config.seed).sample(range(len(chats)), len(chats))
    held_out = set(order[:count])
    return [c for i, c in enumerate(chats) if i not in held_out], [chats[i] for i in sorted(held_out)]


def _load(checkpoint: str, base_model: str, lora: bool) -> Any:
    if not lora:
        return load_causal_lm(checkpoint)
    from peft import PeftModel

    return PeftModel.from_pretrained(load_causal_lm(base_model), checkpoint)


@torch.no_grad()
def output_metrics(model: Any, tokenizer: Any, chats: Sequence[Chat], max_length: int = 1024,
                   batch_size: int = 64) -> dict[str, float]:
    """Output (IT-mask) loss, token accuracy and exact match of `chats` under `model`, each chat cut as training
    cuts it (`sequence_cap(model, max_length)`: the run's `max_length`, or the model's context if shorter). Why the
    run's cap: a fixed one crashed a model of shorter context and scored tokens training never saw. The default,
    1024, is the `bench/im_vs_it` recipe's.

    Accuracy is teacher-forced argmax; an example is an exact match when every output token (and its closing
    `<|im_end|>`) is the argmax, which is what greedy decoding would produce. A chat whose output is cut away
    entirely adds nothing to any of them; when every chat's is, this is a DatasetError, not a loss of 0 that would
    tie (and so decide) the IM/IT comparison."""
    model.eval()
    cap = sequence_cap(model, max_length)
    nll = tokens = correct = exact = scored_chats = 0.0
    for start in range(0, len(chats), batch_size):
        rendered = [render_chat(c, tokenizer, "it") for c in chats[start:start + batch_size]]
        batch = collate_chats(rendered, tokenizer.pad_token_id, cap)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        logits = logits[:, :-1].float()
        targets = batch["input_ids"][:, 1:]
        mask = batch["loss_mask"][:, 1:].float()
        logp = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        hit = (logits.argmax(-1) == targets).float() * mask
        nll += float(-(logp * mask).sum())
        tokens += float(mask.sum())
        correct += float(hit.sum())
        kept = mask.sum(1) > 0
        exact += float(((hit.sum(1) == mask.sum(1)) & kept).sum())
        scored_chats += float(kept.sum())
    if not tokens:
        raise DatasetError(f"all {len(chats)} validation chats lose their whole output at {cap} tokens "
                           f"({cap_words(model, max_length)}): IM and IT cannot be compared on them; raise "
                           "max_length or shorten the instructions")
    return {"loss": nll / tokens, "token_acc": correct / tokens, "exact": exact / scored_chats}


def _tagged(progress: Progress, mode: LossMode) -> Progress:
    return lambda meta: progress({**meta, "loss_mode": mode})


def train_auto_sft(request: LMTrainingRequest, progress: Progress, worker: str, ranks: int, run: Run) -> dict[str, Any]:
    """Train IM and IT (each through `run`, so each resumes and is idempotent on its own) and return the result of
    the better one, its checkpoints cut at the best by validation output loss; the lineage says why."""
    out = Path(request.output_dir)
    config = SFTConfig.from_dict(request.config)
    chats: list[Chat] = chat_messages(load_jsonl(request.dataset, ["messages"]))  # malformed rows fail here
    tokenizer = load_tokenizer(request.base_model)
    static = choose_loss_mode(chats, tokenizer, config)
    split = validation_split(chats, config)
    forced = {**request.config, "validation_dataset": ""}
    if split is None:
        sub = request.model_copy(update={"run_id": f"{request.run_id}-{static.mode}",
                                         "output_dir": str(out / static.mode),
                                         "config": {**forced, "loss_mode": static.mode}})
        result = run(sub, progress, worker, ranks)
        reason = (f"{static.reason}; too few chats to validate both masks (needs {MIN_TRAINING_CHATS} to train on and "
                  f"{MIN_VALIDATION_CHATS} held out)")
        chosen = {**asdict(static), "reason": reason, "length_ratio": static.length_ratio}
        return _finish(out, request, {**result, "run_id": request.run_id, "loss_mode": chosen})
    train, held = split
    data = (write_jsonl([{"messages": list(c)} for c in train], out / "data" / "train.jsonl")
            if not config.validation_dataset else Path(request.dataset))
    results: dict[LossMode, dict[str, Any]] = {}
    scores: dict[LossMode, list[float]] = {}
    for mode in MODES:
        sub = request.model_copy(update={"run_id": f"{request.run_id}-{mode}", "dataset": str(data),
                                         "output_dir": str(out / mode), "config": {**forced, "loss_mode": mode}})
        results[mode] = run(sub, _tagged(progress, mode), worker, ranks)
        scores[mode] = [output_metrics(_load(c, request.base_model, bool(config.lora_r)), tokenizer, held,
                                       config.max_length)["loss"] for c in results[mode]["checkpoints"]]
    best = {mode: min(range(len(s)), key=s.__getitem__) for mode, s in scores.items()}
    mode = min(MODES, key=lambda m: scores[m][best[m]])
    other: LossMode = "it" if mode == "im" else "im"
    winner, cut = results[mode], best[mode] + 1
    step = int(Path(winner["checkpoints"][best[mode]]).name.removeprefix(PREFIX))
    reason = (f"{mode.upper()}: validation output loss {scores[mode][best[mode]]:.4f} at step {step} against "
              f"{other.upper()}'s {scores[other][best[other]]:.4f}, on {len(held)} held-out chats "
              f"(bench/im_vs_it: no ratio/size boundary; the held-out comparison picks the winner)")
    lineage = {**asdict(static), "mode": mode, "reason": reason, "length_ratio": static.length_ratio,
               "validation_chats": len(held), "validation_loss": {m: round(scores[m][best[m]], 6) for m in MODES},
               "best_step": step, "best_checkpoint": {m: results[m]["checkpoints"][best[m]] for m in MODES}}
    final_loss = winner["losses"][min(step, len(winner["losses"])) - 1] if winner["losses"] else winner["final_loss"]
    return _finish(out, request, {**winner, "run_id": request.run_id, "checkpoints": winner["checkpoints"][:cut],
                                  "final_loss": final_loss, "loss_mode": lineage,
                                  "seconds": sum(r["seconds"] for r in results.values())})


def _finish(out: Path, request: LMTrainingRequest, payload: dict[str, Any]) -> dict[str, Any]:
    return write_result(out, {**payload, "method": request.method, "dataset": request.dataset})
