"""Release-gate evidence (issue 16): do paper 2's indicators signal over-optimisation, and does a gate fitted on
them out of sample beat the plain pick?

Run: `python -m bench.gate --quick` (CPU, < 15 min) or `python -m bench.gate` (more seeds and steps).

Regime (`bench/gate_parts.py`): the tiny Llama the project pretrains on CPU (`bench.lm_proxy_parts.build_base`),
trained with DPO / IPO / hinge at small β and high learning rates for several epochs of the chat world's labelled
pairs (`ingest.synthetic_judges`, gold reward known) through the worker's own `run_lm_training`, 10 checkpoints per
run. Per checkpoint: gold of 2 sampled answers per held-out prompt (two independent sets A and B), both indicator
views (generated: greedy continuations; teacher-forced: a gold-preferred reply) on the same prompts, held-out
implicit-reward accuracy on 30 expert pairs.

Analysis: a run *falls* when gold after its peak drops below the peak by more than the difference's standard error.
An indicator rule, run online (seeing checkpoints up to t), *detects* a falling run when it signals at or before the
peak. Rules and thresholds (and the gate's accuracy floor) are fitted on the tuning seeds (first half) and reported
on the others; `*_vs_best` is the gold (set B) of a pick over the gold (set B) of the oracle chosen on set A among
the checkpoints and the base model (a block keeps the base), with paired bootstrap intervals over runs.
The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.gate_parts import (  # noqa: E402
    HELDOUT_PAIRS,
    VIEWS,
    Rule,
    Run,
    RunSpec,
    bootstrap_ci,
    candidate_rules,
    detection,
    fit_detector,
    fit_gate,
    gate_pick,
    heldout_pick,
    lagged_changes,
    make_regime,
    oracle,
    ratio_to_oracle,
    score,
    spearman,
    train_and_score,
    training_pairs,
)

FIGURE = Path(__file__).resolve().parents[1] / "docs" / "figures" / "gate_runs.png"
DEVICE_NOTE = "2-core CPU VM, shared"
# (loss, β) pairs: small β for each loss (IPO's β is τ); paper 2 saw over-optimisation in this range.
LOSSES = [("sigmoid", 0.02), ("sigmoid", 0.1), ("ipo", 0.02), ("ipo", 0.1), ("hinge", 0.05), ("hinge", 0.2)]
LEARNING_RATES = [3e-3, 1e-2, 2e-2]  # high for a tiny model: most runs pass their gold peak within 40 steps
LABEL_TEMPERATURE = 0.1  # the 'tempered' judge's labels: the expert's criterion, a few percent of pairs flipped


def specs(seeds: int) -> list[RunSpec]:
    return [RunSpec(loss, beta, lr, seed) for seed in range(seeds) for loss, beta in LOSSES for lr in LEARNING_RATES]


def plot_runs(runs: list[Run], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(runs), figsize=(3.2 * len(runs), 7), sharex=True, squeeze=False)
    for col, run in enumerate(runs):
        scores = [run.base, *run.checkpoints]
        steps = [s.step for s in scores]
        gold, se = np.array([s.gold for s in scores]), np.array([s.gold_se for s in scores])
        ax = axes[0][col]
        ax.plot(steps, gold, marker="o", color="black")
        ax.fill_between(steps, gold - se, gold + se, alpha=0.2, color="black")
        ax.axvline(run.checkpoints[run.peak].step, color="tab:green", linestyle=":")
        ax.set_title(f"{run.spec.name}\n{'falls' if run.fall is not None else 'does not fall'}", fontsize=8)
        for row, name in ((1, "entropy"), (2, "mass")):
            for view, style in zip(VIEWS, ("-", "--"), strict=True):
                axes[row][col].plot(steps, [s.indicators[f"{view}/{name}_mean"] for s in scores], style, label=view)
        axes[2][col].set_xlabel("step")
    axes[0][0].set_ylabel("gold reward (±SE)")
    axes[1][0].set_ylabel("top-k entropy (bits)")
    axes[2][0].set_ylabel("top-k mass")
    axes[1][0].legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def interval(values: list[float]) -> list[float] | None:
    return bootstrap_ci(values) if values else None


def detection_report(rule: Rule, runs: list[Run]) -> dict[str, Any]:
    d = detection(rule, runs)
    return {"rule": rule.name, "detection": d.detection, "false_alarm": d.false_alarm, "lead": d.lead,
            "falling": d.falling, "steady": d.steady}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="4 seeds x 18 configs, 40 steps (CPU: ~5 min)")
    parser.add_argument("--seeds", type=int, default=0, help="seeds (default 4 quick, 8 full); first half tunes")
    parser.add_argument("--steps", type=int, default=0, help="steps per run (default 40 quick, 80 full); 10 ckpts")
    parser.add_argument("--pairs", type=int, default=256, help="training pairs (2.5 epochs quick, 5 full)")
    parser.add_argument("--warmup", type=int, default=-1,
                        help="linear learning-rate warm-up steps (default steps/5: without it the first steps at these "
                        "rates knock gold below the base and the base is the best choice in half the runs)")
    parser.add_argument("--prompts", type=int, default=64, help="held-out prompts (gold and indicators)")
    parser.add_argument("--work-dir", default="", help="reuse finished runs from here (default: a new temp dir)")
    parser.add_argument("--figure", default=str(FIGURE), help="PNG of a few runs; empty: none")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 by default: on a shared 2-core VM 2 threads ran scoring 6x slower")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = args.seeds or (4 if args.quick else 8)
    steps = args.steps or (40 if args.quick else 80)
    args.warmup = steps // 5 if args.warmup < 0 else args.warmup
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="proxyloop-bench-gate-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PROXYLOOP_REFERENCE_CACHE_DIR", str(work / "reference-cache"))
    import transformers

    transformers.utils.logging.disable_progress_bar()
    from bench.lm_proxy_parts import build_base
    from ingest.synthetic_judges import make_world

    started = time.perf_counter()
    world = make_world(0, "tempered", tempered_temperature=LABEL_TEMPERATURE)
    base = build_base("tiny", work, world)
    regime = make_regime(world, base, args.prompts, max_new_tokens=8)
    base_scores = {seed: score(base, 0, regime, seed) for seed in range(seeds)}
    runs: list[Run] = []
    for spec in specs(seeds):
        tag = f"{spec.name}-{steps}-{args.pairs}-w{args.warmup}"
        cached = work / "scores" / f"{tag}.json"
        if cached.exists():
            runs.append(Run.from_json(json.loads(cached.read_text())))
            continue
        t0 = time.perf_counter()
        dataset = training_pairs(world, args.pairs, spec.seed, work / "data" / f"pairs-{spec.seed}-{args.pairs}.jsonl")
        run = train_and_score(regime, spec, dataset, work / "runs" / tag, steps,
                              max(1, steps // 10), base_scores[spec.seed], args.warmup)
        run.seconds = time.perf_counter() - t0
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(run.to_json()))
        runs.append(run)
        print(f"{spec.name}: gold {run.base.gold:.3f} → peak {max(run.gold):.3f}@{run.checkpoints[run.peak].step} "
              f"→ last {run.gold[-1]:.3f} ({'falls' if run.fall is not None else 'steady'}), {run.seconds:.0f}s",
              flush=True)

    tuning = [r for r in runs if r.spec.seed < seeds / 2]
    held = [r for r in runs if r.spec.seed >= seeds / 2]
    # The relation: which rule detects on the tuning runs, reported on the held-out ones; the default rules beside.
    detector = fit_detector(candidate_rules(), tuning)  # any reading of the indicators, diagnostics included
    found = detection(detector, held)
    gate_detector = fit_detector(candidate_rules(gate_only=True), tuning)  # the rules the gate can apply
    defaults = [Rule("generated", "entropy", 0.02, 2), Rule("teacher_forced", "entropy", 0.02, 2),
                Rule("generated", "mass", 0.2), Rule("teacher_forced", "mass", 0.2)]
    keys = [f"{v}/{n}_mean" for v in VIEWS for n in ("entropy", "mass")]
    correlation = {k: spearman(*lagged_changes(runs, k)) for k in keys}
    # Calibration out of sample: the gate's rule and floor fitted on the tuning runs.
    rule, floor = fit_gate(tuning, floors=(0.0, 0.55))
    gate = [ratio_to_oracle(r, gate_pick(r, rule, floor)) for r in held]
    plain = [ratio_to_oracle(r, heldout_pick(r)) for r in held]
    last = [ratio_to_oracle(r, len(r.checkpoints) - 1) for r in held]
    advisory = [ratio_to_oracle(r, gate_pick(r, None, 0.55)) for r in held]  # production's default gate
    # What scoring the oracle on its own samples would add: the bias the two-set denominator removes.
    oracle_bias = [float(np.mean(oracle(r).gold_a)) / max(1e-9, float(np.mean(oracle(r).gold_b))) for r in held]
    difference = bootstrap_ci([g - p for g, p in zip(gate, plain, strict=True)])
    over_advisory = bootstrap_ci([g - a for g, a in zip(gate, advisory, strict=True)])
    report: dict[str, Any] = {
        "indicator_detection": found.detection, "indicator_detection_ci": interval(found.detected),
        "indicator_false_alarm": found.false_alarm, "indicator_false_alarm_ci": interval(found.alarms),
        "indicator_lead_checkpoints": found.lead, "indicator_lead_checkpoints_ci": interval(found.leads),
        "indicator_rule": detector.name,
        "indicator_rule_in_gate": detector.in_gate, "gate_rules_detector": detection_report(gate_detector, held),
        "falling_runs": found.falling, "steady_runs": found.steady,
        "gate_vs_best": round(float(np.mean(gate)), 4), "gate_vs_best_ci": bootstrap_ci(gate),
        "heldout_pick_vs_best": round(float(np.mean(plain)), 4), "heldout_pick_vs_best_ci": bootstrap_ci(plain),
        "last_vs_best": round(float(np.mean(last)), 4), "last_vs_best_ci": bootstrap_ci(last),
        "oracle_vs_best": 1.0, "oracle_selection_bias": round(float(np.mean(oracle_bias)), 4),
        "gate_minus_heldout_pick_ci": difference,
        "advisory_gate_vs_best": round(float(np.mean(advisory)), 4), "advisory_gate_vs_best_ci": bootstrap_ci(advisory),
        "gate_minus_advisory_gate_ci": over_advisory,
        "gate_blocks": sum(gate_pick(r, rule, floor) is None for r in held),
        "oracle_is_base": sum(oracle(r) is r.base for r in held),
        "gate_rule": rule.name if rule else "advisory (no indicator rule)", "gate_floor": floor,
        "spearman_indicator_change_vs_next_gold_change": {k: None if v is None else round(v, 3)
                                                          for k, v in correlation.items()},
        "default_rules_on_heldout_runs": [detection_report(r, held) for r in defaults],
        "targets_met": {"detection": bool((found.detection or 0) >= 0.8 and (found.false_alarm or 0) <= 0.1),
                        "gate": bool(np.mean(gate) >= 0.95 and difference[0] > 0),
                        "gate_interval_above_heldout_pick_interval": bool(
                            bootstrap_ci(gate)[0] > bootstrap_ci(plain)[1])},
        "runs": len(runs), "tuning_runs": len(tuning), "reported_runs": len(held), "seeds": seeds, "steps": steps,
        "checkpoints_per_run": min(len(r.checkpoints) for r in runs), "prompts": args.prompts,
        "heldout_pairs": HELDOUT_PAIRS, "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - started, 1),
    }
    if args.figure:
        falling = [r for r in held if r.fall is not None][:3]
        steady = [r for r in held if r.fall is None][:1]
        report["figure"] = str(plot_runs(falling + steady or held[:4], Path(args.figure)))
    print(f"detector {detector.name} on held-out runs: detection {found.detection}, false alarms "
          f"{found.false_alarm}, lead {found.lead} ({found.falling} falling, {found.steady} steady)")
    print(f"gate ({report['gate_rule']}, floor {floor}) {report['gate_vs_best']} {report['gate_vs_best_ci']}, "
          f"held-out pick {report['heldout_pick_vs_best']}, last {report['last_vs_best']}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
