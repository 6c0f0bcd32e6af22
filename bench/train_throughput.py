"""Tokens/s of our DPO step vs TRL's DPOTrainer on the same model, batch shape, dtype and device.

Run: `python -m bench.train_throughput --quick` (CPU, a small random Llama) or
`python -m bench.train_throughput --model smollm2` (after `proxyloop models prepare smollm2`).
The last line printed is JSON with `ratio` = ours / TRL tokens per second.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from workers.lm.models import build_tiny, load_causal_lm, load_tokenizer  # noqa: E402
from workers.lm.training.data import collate_pairs, tokenize_pairs  # noqa: E402
from workers.lm.training.dpo import completion_token_logps, dpo_batch_loss, reference_logps  # noqa: E402
from workers.lm.training.dpo_config import DPOConfig  # noqa: E402
from workers.lm.training.objectives import sequence_logps  # noqa: E402
from workers.lm.training.run import autocast_for  # noqa: E402

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def make_pairs(n: int, words: int) -> list[dict[str, str]]:
    """Pairs of near-equal length, so every batch holds about the same number of tokens."""
    vocab = ["annotator", "prefers", "first", "response", "proxy", "judge", "ranks", "longer", "reply", "model"]
    rows = []
    for i in range(n):
        prompt = " ".join(vocab[(i + j) % len(vocab)] for j in range(words))
        rows.append({"prompt": prompt, "chosen": " " + " ".join(vocab[(i * 3 + j) % 10] for j in range(words // 2)),
                     "rejected": " " + " ".join(vocab[(i * 7 + j) % 10] for j in range(words // 2))})
    return rows


def time_ours(model, tokenizer, rows, config, device, steps, warmup) -> tuple[float, float]:
    """Seconds per step and tokens per step of our loop body: one policy forward/backward + AdamW."""
    pairs = tokenize_pairs(rows, tokenizer)
    autocast = autocast_for(device, config.bf16)
    ref_c, ref_r = reference_logps(model, pairs, config, tokenizer.pad_token_id, device, autocast)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    model.train()
    tokens, elapsed = 0, 0.0
    for step in range(warmup + steps):
        lo = (step * config.batch_size) % len(pairs)
        idx = list(range(lo, lo + config.batch_size))
        batch = {k: v.to(device) for k, v in collate_pairs([pairs[i] for i in idx], tokenizer.pad_token_id,
                                                             config.max_length).items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            loss, _ = dpo_batch_loss(model, batch, ref_c[idx].to(device), ref_r[idx].to(device), config)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss)
        if step >= warmup:
            elapsed += time.perf_counter() - t0
            tokens += int(batch["attention_mask"].sum())
    return elapsed / steps, tokens / steps


def time_trl(model, tokenizer, rows, config, device, steps, warmup, work: Path) -> tuple[float, float]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.t0 = 0.0

        def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)

    bf16 = bool(config.bf16 if config.bf16 is not None else device.type == "cuda")
    args = TRLConfig(output_dir=str(work), loss_type=["sigmoid"], beta=config.beta, learning_rate=config.learning_rate,
                     per_device_train_batch_size=config.batch_size, max_steps=warmup + steps, report_to=[],
                     logging_steps=10_000, save_strategy="no", use_cpu=device.type == "cpu", bf16=bf16,
                     gradient_checkpointing=False, max_length=config.max_length, dataloader_num_workers=0,
                     lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, disable_tqdm=True)
    timer = StepTimer()
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(config.batch_size)])
    tokens = float(batch["attention_mask"].sum())
    return sum(timer.times[warmup:]) / steps, tokens


def loss_parity(model, tokenizer, rows, config, device, work: Path) -> tuple[float, float]:
    """Our loss and TRL's on the same first batch, same weights, before any step."""
    from datasets import Dataset
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    policy, reference = copy.deepcopy(model), copy.deepcopy(model)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer steps (CPU: a few minutes)")
    parser.add_argument("--model", default="tiny", help="'tiny', 'smollm2', or a Hugging Face model directory")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--words", type=int, default=40, help="prompt words (responses are half)")
    parser.add_argument("--steps", type=int, default=0)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps = args.steps or (6 if args.quick else 20)
    work = Path(tempfile.mkdtemp(prefix="proxyloop-bench-"))
    if args.model == "tiny":
        path = build_tiny(work / "tiny", n_layer=4, n_embd=256, n_head=4, vocab_size=2048)
    elif args.model == "smollm2":
        from workers.cli import models_dir

        path = models_dir() / "smollm2-135m-instruct"
    else:
        path = Path(args.model)
    tokenizer = load_tokenizer(path)
    config = DPOConfig(loss_type="sigmoid", beta=0.1, learning_rate=1e-6, batch_size=args.batch_size, max_length=512,
                       logp_reduction="sum")
    rows = make_pairs(args.batch_size * (steps + 2), args.words)
    base = load_causal_lm(path, device)
    n_params = sum(p.numel() for p in base.parameters())
    ours_loss, trl_loss = loss_parity(base, tokenizer, rows, config, device, work / "parity")
    ours_s, ours_tokens = time_ours(copy.deepcopy(base), tokenizer, rows, config, device, steps, warmup=2)
    trl_s, trl_tokens = time_trl(copy.deepcopy(base), tokenizer, rows, config, device, steps, 2, work / "trl")
    ours_tps, trl_tps = ours_tokens / ours_s, trl_tokens / trl_s
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "model": args.model, "params": n_params,
              "dtype": "bf16-autocast" if device.type == "cuda" else "fp32", "batch_pairs": args.batch_size,
              "tokens_per_step": ours_tokens, "steps": steps, "ours_tokens_per_s": round(ours_tps, 1),
              "trl_tokens_per_s": round(trl_tps, 1), "loss_ours": ours_loss, "loss_trl": trl_loss,
              "loss_abs_diff": abs(ours_loss - trl_loss), "ratio": round(ours_tps / trl_tps, 3)}
    if device.type == "cuda":
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in report["device"]), None)
        if peak:
            report["mfu_ours"] = round(6 * n_params * ours_tps / peak, 4)  # forward + backward, policy only
    print(f"ours {ours_tps:.0f} tokens/s, TRL DPOTrainer {trl_tps:.0f} tokens/s, ratio {report['ratio']}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
