"""Instruction Modelling vs instruction tuning (paper 4): a sweep over length ratio × data size × seeds.

Run: `python -m bench.im_vs_it --quick`. For every task (instruction/output length ratio, see
`bench/im_vs_it_parts.py`), training-set size and seed, the same tiny model is trained on the same
data with IM and with IT, and each is scored on a test split: output loss, token accuracy, exact
match, and the train-vs-test gap. Each dataset is trained once, through the worker's
`loss_mode="auto"` (`workers/lm/training/sft_auto.py`) with the validation chats as its
`validation_dataset`: it trains IM and IT, keeps each one's checkpoint with the lowest validation
output loss (early stopping) and picks the lower.

A cell (ratio × size) goes to IM when IT's test output loss minus IM's is above 0 beyond its 95%
bootstrap interval over seeds, to IT when below, else it is a tie. `rule_agreement`: reporting
cells where the worker's pick (the majority of the cell's seeds) agrees with the verdict (any pick
agrees with a tie); `rule_agreement_runs` the same per dataset. Baselines from the same runs:
`static_rule_agreement`, the static ratio/size rule `sft.auto_choice` (what auto falls back to on
datasets too small to hold chats out), and `fitted_rule_agreement`, the best "IM iff ratio ≥ R and
n ≤ N" fitted on the tuning seeds. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.im_vs_it_parts import (  # noqa: E402
    TASKS,
    agrees,
    bootstrap_ci,
    build_base,
    cell_chats,
    cell_verdict,
    fit_rule,
    sft_config,
)
from ground.schemas import LMTrainingRequest  # noqa: E402
from workers.lm.models import load_causal_lm, load_tokenizer  # noqa: E402
from workers.lm.snapshot_data import write_jsonl  # noqa: E402
from workers.lm.training.run import run_lm_training  # noqa: E402
from workers.lm.training.sft import auto_choice  # noqa: E402
from workers.lm.training.sft_auto import output_metrics  # noqa: E402
from workers.lm.training.sft_config import SFTConfig  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def run_cell(work: Path, base: Path, tokenizer: Any, task: str, n: int, seed: int,
             args: argparse.Namespace) -> dict[str, Any]:
    """The worker's `loss_mode="auto"` on one (task, size, seed) dataset with the validation chats as its
    `validation_dataset`: it trains IM and IT and picks one; metrics of each mode's early-stopped checkpoint."""
    train, val, test = cell_chats(task, n, seed, args.val, args.test)
    cell = work / f"{task}-{n}-{seed}"
    cell.mkdir(parents=True, exist_ok=True)
    data = write_jsonl([{"messages": c} for c in train], cell / "train.jsonl")
    held = write_jsonl([{"messages": c} for c in val], cell / "validation.jsonl")
    config = sft_config(args.steps, args.every, args.lr, seed, str(held))
    run = run_lm_training(LMTrainingRequest(run_id=cell.name, method="sft", base_model=str(base), dataset=str(data),
                                            output_dir=str(cell / "auto"), config=config), lambda _: None)
    choice = run["loss_mode"]
    static = auto_choice(choice["length_ratio"], n, SFTConfig()).mode  # the baseline: the best ratio/size rule
    row: dict[str, Any] = {"task": task, "n": n, "seed": seed, "ratio": choice["length_ratio"],
                           "auto_pick": choice["mode"], "static_pick": static}
    for mode in ("im", "it"):
        best = choice["best_checkpoint"][mode]
        model = load_causal_lm(best)
        tested, trained = output_metrics(model, tokenizer, test), output_metrics(model, tokenizer, train[:64])
        row[mode] = {"best_step": int(Path(best).name.split("-")[-1]), "val_loss": choice["validation_loss"][mode],
                     **{f"test_{k}": v for k, v in tested.items()}, "train_loss": trained["loss"],
                     "gap": tested["loss"] - trained["loss"]}
    return row


def summarise(rows: list[dict[str, Any]], seeds: list[int]) -> list[dict[str, Any]]:
    """One record per (task, size) over `seeds`: IM/IT metrics with intervals, verdict, the worker's picks (the
    cell's pick is the majority of its seeds'; ties go to IT) and the static ratio/size rule's."""
    cells = []
    for task in TASKS:
        for n in sorted({r["n"] for r in rows}):
            group = [r for r in rows if r["task"] == task and r["n"] == n and r["seed"] in seeds]
            if not group:
                continue
            verdict, diff = cell_verdict([r["it"]["test_loss"] - r["im"]["test_loss"] for r in group])
            ratio = sum(r["ratio"] for r in group) / len(group)
            picks = [r["auto_pick"] for r in group]
            pick = "im" if 2 * picks.count("im") > len(picks) else "it"
            static = auto_choice(ratio, n, SFTConfig()).mode  # the ratio/size rule at this cell's size and mean ratio
            record: dict[str, Any] = {"task": task, "n": n, "ratio": round(ratio, 2), "seeds": len(group),
                                      "verdict": verdict, "it_minus_im_loss": [round(x, 4) for x in diff],
                                      "auto_pick": pick, "auto_picks": "".join(p[1] for p in picks),
                                      "agrees": agrees(pick, verdict),
                                      "runs_agree": [agrees(p, verdict) for p in picks],
                                      "static_pick": static, "static_agrees": agrees(static, verdict)}
            for mode in ("im", "it"):
                for key in ("test_loss", "test_token_acc", "test_exact", "gap", "best_step"):
                    m, lo, hi = bootstrap_ci([float(r[mode][key]) for r in group])
                    record[f"{mode}_{key}"] = [round(m, 4), round(lo, 4), round(hi, 4)]
            cells.append(record)
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="64 steps per run, sizes 16,64,256, 3+3 seeds")
    parser.add_argument("--sizes", type=_ints, default=None, help="training-set sizes, comma-separated")
    parser.add_argument("--tune-seeds", type=_ints, default=None, help="seeds the rule is fitted on")
    parser.add_argument("--report-seeds", type=_ints, default=None, help="seeds the rule is scored on")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps per run (batch 8)")
    parser.add_argument("--every", type=int, default=None, help="checkpoint (early-stopping candidate) interval")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--val", type=int, default=32, help="validation chats (early stopping)")
    parser.add_argument("--test", type=int, default=64, help="test chats (reported)")
    parser.add_argument("--rows", type=Path, default=None, help="jsonl of finished runs: appended to, and reused")
    args = parser.parse_args()
    args.sizes = args.sizes or [16, 64, 256]
    args.tune_seeds = args.tune_seeds or ([0, 1, 2] if args.quick else [0, 1, 2, 3, 4])
    args.report_seeds = args.report_seeds or ([100, 101, 102] if args.quick else [100, 101, 102, 103, 104])
    args.steps = args.steps or (64 if args.quick else 200)
    args.every = args.every or (16 if args.quick else 25)
    torch.set_num_threads(1)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="proxyloop-imit-"))
    rows_path = args.rows or work / "rows.jsonl"
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()] if rows_path.exists() else []
    done = {(r["task"], r["n"], r["seed"]) for r in rows}
    for seed in args.tune_seeds + args.report_seeds:
        if all((t, n, seed) in done for t in TASKS for n in args.sizes):
            continue
        base = build_base(work / f"base-{seed}", seed)
        tokenizer = load_tokenizer(base)
        for task in TASKS:
            for n in args.sizes:
                if (task, n, seed) in done:
                    continue
                row = run_cell(work, base, tokenizer, task, n, seed, args)
                rows.append(row)
                with rows_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"[{time.perf_counter() - started:6.0f}s] {task:8s} n={n:4d} seed={seed:3d} "
                      f"ratio={row['ratio']:6.2f} test loss IM {row['im']['test_loss']:.3f} "
                      f"IT {row['it']['test_loss']:.3f}", flush=True)
    rows = [r for r in rows if r["n"] in args.sizes]
    tune = summarise(rows, args.tune_seeds)
    report = summarise(rows, args.report_seeds)
    fitted = fit_rule(tune)
    for c in report:
        fitted_pick = "im" if c["ratio"] >= fitted["min_ratio"] and c["n"] <= fitted["max_examples"] else "it"
        c["fitted_agrees"] = agrees(fitted_pick, c["verdict"])
    print(f"{'task':8s} {'n':>4s} {'ratio':>6s} {'IT-IM loss [95% CI]':>26s} verdict pick (per seed)  "
          f"IM exact / IT exact   IM gap / IT gap")
    for c in report:
        d = c["it_minus_im_loss"]
        print(f"{c['task']:8s} {c['n']:4d} {c['ratio']:6.2f} {d[0]:+8.4f} [{d[1]:+.4f}, {d[2]:+.4f}]   "
              f"{c['verdict']:4s}  {c['auto_pick']:3s} ({c['auto_picks']})  "
              f"{c['im_test_exact'][0]:.2f} / {c['it_test_exact'][0]:.2f}"
              f"   {c['im_gap'][0]:+.3f} / {c['it_gap'][0]:+.3f}")

    def share(flags: list[bool]) -> list[float]:
        m, lo, hi = bootstrap_ci([float(f) for f in flags])
        return [round(m, 3), round(lo, 3), round(hi, 3)]

    summary = {
        "device": "cpu", "steps": args.steps, "checkpoint_every": args.every, "sizes": args.sizes,
        "tune_seeds": args.tune_seeds, "report_seeds": args.report_seeds, "cells": len(report),
        "rule": "loss_mode=auto: IM and IT trained, the lower validation output loss kept (sft_auto)",
        "fitted_rule_on_tune_seeds": {k: None if v == float("inf") else round(v, 3) for k, v in fitted.items()},
        "im_wins_share": share([c["verdict"] == "im" for c in report]),
        "it_wins_share": share([c["verdict"] == "it" for c in report]),
        "rule_agreement": share([c["agrees"] for c in report]),
        "rule_agreement_runs": share([a for c in report for a in c["runs_agree"]]),
        "rule_agreement_tune": share([c["agrees"] for c in tune]),
        "static_rule_agreement": share([c["static_agrees"] for c in report]),
        "fitted_rule_agreement": share([c["fitted_agrees"] for c in report]),
        "target_rule_agreement": 0.9,
        "met": sum(c["agrees"] for c in report) / max(len(report), 1) >= 0.9,
        "wall_s": round(time.perf_counter() - started, 1), "rows": str(rows_path),
        "report_cells": [{k: c[k] for k in ("task", "n", "ratio", "verdict", "it_minus_im_loss", "auto_pick",
                                            "auto_picks", "static_pick", "im_test_loss", "it_test_loss",
                                            "im_test_exact", "it_test_exact",
                                            "im_gap", "it_gap")} for c in report],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
