"""Power and false alarms of the condition tests: how often each check fails on each generator.

    nice .venv/bin/python -m bench.conditions_power [--quick] [--seeds 20] [--n-expert 35 100]

Satisfying generators: the demo's "ok" world and the Appendix D family's permuted and tempered
proxies. Violating generators break one condition each (ingest/synthetic.py). A run of a violating
generator is detected when the check of the condition it breaks fails; a run of a satisfying one is
a false alarm when any of the four paper-condition checks fails. Seeds are split evenly over the
expert sample sizes. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import numpy as np
import torch

from ground.schemas import ConditionReport, FeatureTriple
from ingest.synthetic import appendix_d, appendix_d_family, draw_triples
from policies.features.conditions import CHECK_NAMES, run_condition_tests
from policies.plan_choice import PAPER_CONDITIONS

N_PROXY = 8000
SATISFYING = ("ok", "family_permuted", "family_tempered")
VIOLATING = {
    "merged_level_sets": "shared_level_sets",
    "missing_image": "image_containment",
    "high_dim": "low_dimensional_encoding",
    "large_L": "similarity_preserved",
}


def snapshot(generator: str, seed: int, n_expert: int) -> tuple[list[FeatureTriple], list[FeatureTriple], int]:
    """(expert triples, proxy triples, |Y|) of one generator at one seed."""
    if generator.startswith("family_"):
        world = appendix_d_family(seed, generator.removeprefix("family_"))
        rng = np.random.default_rng(seed + 1)
        proxy = draw_triples(world, N_PROXY, expert=False, rng=rng)
        return draw_triples(world, n_expert, expert=True, rng=rng), proxy, world.n_outputs
    task = appendix_d(n_proxy=N_PROXY, n_expert=n_expert, n_heldout=0, seed=seed, variant=generator)
    return task.expert, task.proxy, task.n_outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 seeds per generator instead of 20")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--n-expert", type=int, nargs="+", default=[35, 100])
    args = parser.parse_args()
    torch.set_num_threads(1)
    n_seeds = args.seeds or (6 if args.quick else 20)
    started = time.perf_counter()
    reports: dict[str, list[ConditionReport]] = {}
    for generator in (*SATISFYING, *VIOLATING):
        reports[generator] = []
        for seed in range(n_seeds):
            n_expert = args.n_expert[seed % len(args.n_expert)]
            expert, proxy, n_outputs = snapshot(generator, seed, n_expert)
            reports[generator].append(run_condition_tests(expert, proxy, f"{generator}-{seed}", seed, n_outputs))
        print(f"{generator}: {n_seeds} runs ({time.perf_counter() - started:.0f} s)", flush=True)

    print(f"\nfailure rate of each check over {n_seeds} seeds per generator ({N_PROXY} proxy, "
          f"{'/'.join(map(str, args.n_expert))} expert triples), and the plans chosen")
    print(f"{'generator':>18} " + " ".join(f"{c[:14]:>14}" for c in CHECK_NAMES[1:]) + "  flagged  plans")
    detected, alarms, by_size = [], [], Counter[str]()
    for generator, runs in reports.items():
        failed = {c: np.mean([not _passed(r, c) for r in runs]) for c in CHECK_NAMES[1:]}
        if generator in VIOLATING:
            hits = [not _passed(r, VIOLATING[generator]) for r in runs]
            detected += hits
            for r, hit in zip(runs, hits, strict=True):
                by_size[f"detected@{r.n_expert}"] += hit
                by_size[f"runs_violating@{r.n_expert}"] += 1
        else:
            hits = [any(not _passed(r, c) for c in PAPER_CONDITIONS) for r in runs]
            alarms += hits
            for r, hit in zip(runs, hits, strict=True):
                by_size[f"alarms@{r.n_expert}"] += hit
                by_size[f"runs_satisfying@{r.n_expert}"] += 1
        plans = Counter(r.plan for r in runs)
        print(f"{generator:>18} " + " ".join(f"{failed[c]:>14.2f}" for c in CHECK_NAMES[1:])
              + f"  {np.mean(hits):>7.2f}  {dict(plans)}")
    rates = {
        f"{kind}_rate@{n}": by_size[f"{num}@{n}"] / max(by_size[f"runs_{den}@{n}"], 1)
        for n in args.n_expert
        for kind, num, den in (("detection", "detected", "violating"), ("false_alarm", "alarms", "satisfying"))
    }
    print(json.dumps({"detection_rate": float(np.mean(detected)), "false_alarm_rate": float(np.mean(alarms)),
                      **rates, "seeds_per_generator": n_seeds, "n_proxy": N_PROXY, "n_expert": args.n_expert,
                      "seconds": round(time.perf_counter() - started, 1)}))


def _passed(report: ConditionReport, name: str) -> bool:
    return next(c.passed for c in report.checks if c.name == name)


if __name__ == "__main__":
    main()
