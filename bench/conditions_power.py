"""Power and false alarms of the condition tests, and what the chosen plan costs when it is wrong.

    nice .venv/bin/python -m bench.conditions_power [--quick] [--seeds 20] [--seed-start 100]
        [--families ...] [--n-expert 35 100] [--no-regret] [--results runs.jsonl]
    nice .venv/bin/python -m bench.conditions_power --aggregate a.jsonl b.jsonl [--families ...]

A long run can be split over processes or machines (by generator or by seed range, each with
`--results`) and tabulated at once with `--aggregate`; every generator pooled must share its seeds.
`--trained runs.jsonl` reuses those runs' trained plans (their gold accuracies) and re-runs only the
condition tests: how a change to the tests moves the regret, in minutes instead of hours.

Satisfying generators: the demo's "ok" world and the Appendix D family's permuted, tempered,
invertible and more_outputs proxies. Violating generators break one condition each (ingest/synthetic.py;
the family's partly_wrong and blind_direction proxies break shared level sets,
ingest/synthetic_families.py). A run of a violating generator is detected when the check of the
condition it breaks fails; a run of a satisfying one is a false alarm when any of the four
paper-condition checks fails. Seeds are split evenly over the expert sample sizes.

Regret: every plan is trained with the training worker (workers.features.tasks.train_feature_policy,
the recipe users get) on the run's proxy and expert triples and scored by gold ranking accuracy on
5000 fresh inputs; the chosen plan's regret is the best plan's accuracy minus the chosen one's, and
"refuse" serves nothing, so it scores a coin's 0.5 (what is lost by not training). The plan avoids a
loss when the chosen plan's accuracy is at least expert-only's minus 0.01.

Seeds: 0–49 are for tuning (the thresholds in policies/features/condition_config.py were chosen there);
report on seeds 100 and up (`--seed-start`, default 100). Every rate and mean regret comes with a 95%
bootstrap interval over seeds (`*_ci`); `families` holds each generator's figures. The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ground.schemas import ConditionReport, FeatureTriple, Plan, TrainingRequest
from ingest.synthetic import appendix_d
from ingest.synthetic_families import appendix_d_family, draw_triples
from policies.features.conditions import CHECK_NAMES, run_condition_tests
from policies.loader import load_policy_dir
from policies.plan_choice import CANDIDATES, PAPER_CONDITIONS
from workers.features.tasks import train_feature_policy

N_PROXY, N_TEST = 8000, 5000
SEED_START = 100  # reporting seeds; 0-49 are for tuning
QUICK_SEEDS, SEEDS = 3, 20  # quick was 6 seeds over 7 generators; 3 over 11 keeps it near 15 min
BOOTSTRAP = 1000
AVOID_TOLERANCE = 0.01  # the plan "avoids a loss" when within this accuracy of expert-only (or above)
SATISFYING = ("ok", "family_permuted", "family_tempered", "family_invertible", "family_more_outputs")
VIOLATING = {
    "merged_level_sets": "shared_level_sets",
    "missing_image": "image_containment",
    "high_dim": "low_dimensional_encoding",
    "large_L": "similarity_preserved",
    "family_partly_wrong": "shared_level_sets",
    "family_blind_direction": "shared_level_sets",
}
GENERATORS = (*SATISFYING, *VIOLATING)
Gold = Callable[[np.ndarray], np.ndarray]  # x [N, 5] -> the expert's log-probabilities [N, |Y_expert|]


def snapshot(generator: str, seed: int, n_expert: int) -> tuple[list[FeatureTriple], list[FeatureTriple], int, Gold]:
    """(expert triples, proxy triples, |Y|, the expert's gold log-probabilities) of one generator at one seed."""
    if generator.startswith("family_"):
        world = appendix_d_family(seed, generator.removeprefix("family_"))
        rng = np.random.default_rng(seed + 1)
        proxy = draw_triples(world, N_PROXY, expert=False, rng=rng)
        return draw_triples(world, n_expert, expert=True, rng=rng), proxy, world.n_outputs, world.expert_log_probs
    task = appendix_d(n_proxy=N_PROXY, n_expert=n_expert, n_heldout=0, seed=seed, variant=generator)
    return task.expert, task.proxy, task.n_outputs, task.world.expert_log_probs


def gold_accuracy(log_probs: np.ndarray, gold: np.ndarray) -> float:
    """Share of output pairs (of the expert's outputs) at each input that the model orders as the expert does."""
    k = gold.shape[1]
    lp = log_probs[:, :k]
    a, b = np.triu_indices(k, 1)
    return float((np.sign(lp[:, a] - lp[:, b]) == np.sign(gold[:, a] - gold[:, b])).mean())


def plan_accuracies(expert: Sequence[FeatureTriple], proxy: Sequence[FeatureTriple], gold: Gold,
                    seed: int) -> dict[str, float]:
    """Gold accuracy of every plan as the training worker trains it; "refuse" serves nothing (a coin)."""
    x = np.random.default_rng([seed, 7]).standard_normal((N_TEST, len(expert[0].x)))
    gold_lp = gold(x)
    out: dict[str, float] = {"refuse": 0.5}
    plan: Plan
    for plan in CANDIDATES:
        with tempfile.TemporaryDirectory() as out_dir:
            request = TrainingRequest(run_id=f"bench-{plan}", snapshot_id="bench", store_url="sqlite://", plan=plan,
                                      output_dir=out_dir, seed=seed, checkpoint_every=10**6)
            result = train_feature_policy(request, proxy, expert, torch.device("cpu"), "bench", lambda _: None)
            model = load_policy_dir(result.checkpoints[-1].path)
            with torch.no_grad():
                lp = model.log_probs(torch.tensor(x, dtype=torch.float32)).double().numpy()  # type: ignore[operator]
        out[plan] = gold_accuracy(lp, gold_lp)
    return out


def interval(outcomes: np.ndarray, seed: int = 0) -> list[float]:
    """95% bootstrap interval of the mean of `outcomes` [generators, seeds], resampling seeds (columns)."""
    outcomes = np.atleast_2d(np.asarray(outcomes, dtype=np.float64))
    if outcomes.size == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    cols = rng.integers(0, outcomes.shape[1], size=(BOOTSTRAP, outcomes.shape[1]))
    means = outcomes[:, cols].mean(axis=(0, 2))
    return [round(float(q), 4) for q in np.quantile(means, [0.025, 0.975])]


def _passed(report: ConditionReport, name: str) -> bool:
    return next(c.passed for c in report.checks if c.name == name)


def _hit(generator: str, report: ConditionReport) -> bool:
    """Detected (violating generator) or false alarm (satisfying one)."""
    if generator in VIOLATING:
        return not _passed(report, VIOLATING[generator])
    return any(not _passed(report, c) for c in PAPER_CONDITIONS)


Runs = tuple[dict[str, list[ConditionReport]], dict[str, list[dict[str, float]]], list[int], list[int]]


def recorded_runs(paths: Sequence[Path]) -> Iterator[dict[str, Any]]:
    """The runs `run` wrote to these `--results` JSON-lines files, one record each, in file order."""
    for path in paths:
        for line in path.read_text().splitlines():
            yield json.loads(line)


def trained_accuracies(paths: Sequence[Path]) -> dict[tuple[str, int, int], dict[str, float]]:
    """Plan accuracies of earlier `--results` runs by (generator, seed, expert triples). Training every plan does not
    depend on the condition tests (only the choice among the plans does), so a change to the tests can be scored
    on the same seeds without retraining."""
    return {(r["generator"], int(r["seed"]), int(r["n_expert"])): r["accuracies"] for r in recorded_runs(paths)
            if r["accuracies"] is not None}


def run(generators: Sequence[str], seeds: list[int], sizes: list[int], regret: bool, results: Path | None,
        started: float, trained: Mapping[tuple[str, int, int], dict[str, float]] | None = None) -> Runs:
    """(reports, plan accuracies, seeds, sizes) of every generator at every seed; with `results`, each run is
    also appended to that JSON-lines file as it finishes (`load` reads it back). Plan accuracies found in
    `trained` (`trained_accuracies`) are reused instead of training the plans again."""
    trained = trained or {}
    reports: dict[str, list[ConditionReport]] = {}
    accuracies: dict[str, list[dict[str, float]]] = {}
    for generator in generators:
        reports[generator], accuracies[generator] = [], []
        for seed, n_expert in zip(seeds, sizes, strict=True):
            expert, proxy, n_outputs, gold = snapshot(generator, seed, n_expert)
            reports[generator].append(run_condition_tests(expert, proxy, f"{generator}-{seed}", seed, n_outputs))
            if regret:
                known = trained.get((generator, seed, n_expert))
                accuracies[generator].append(known or plan_accuracies(expert, proxy, gold, seed))
            if results is not None:
                record = {"generator": generator, "seed": seed, "n_expert": n_expert,
                          "report": reports[generator][-1].model_dump(mode="json"),
                          "accuracies": accuracies[generator][-1] if regret else None}
                with results.open("a") as f:
                    f.write(json.dumps(record) + "\n")
        print(f"{generator}: {len(seeds)} runs ({time.perf_counter() - started:.0f} s)", flush=True)
    return reports, accuracies, seeds, sizes


def load(paths: Sequence[Path], generators: Sequence[str]) -> Runs:
    """`run`'s output from the JSON-lines files of earlier `--results` runs (split over processes or machines),
    for the generators asked for; every generator must have been run at the same seeds."""
    records: dict[str, dict[int, dict[str, Any]]] = {}
    for record in recorded_runs(paths):
        if record["generator"] in generators:
            records.setdefault(record["generator"], {})[int(record["seed"])] = record
    if not records:
        raise SystemExit(f"no runs of {', '.join(generators)} in {', '.join(map(str, paths))}")
    seed_sets = {g: sorted(by_seed) for g, by_seed in records.items()}
    seeds = next(iter(seed_sets.values()))
    if any(s != seeds for s in seed_sets.values()):
        raise SystemExit(f"generators were run at different seeds, cannot pool them: {seed_sets}")
    ordered = [g for g in GENERATORS if g in records]
    reports = {g: [ConditionReport.model_validate(records[g][s]["report"]) for s in seeds] for g in ordered}
    # A generator's regret needs every seed's plan accuracies (runs with --no-regret have none).
    accuracies = {g: [records[g][s]["accuracies"] for s in seeds]
                  if all(records[g][s]["accuracies"] is not None for s in seeds) else [] for g in ordered}
    sizes = [int(records[ordered[0]][s]["n_expert"]) for s in seeds]
    return reports, accuracies, seeds, sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SEEDS} seeds per generator instead of {SEEDS}")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--seed-start", type=int, default=SEED_START,
                        help="first seed (default 100: reporting; seeds 0-49 are for tuning)")
    parser.add_argument("--families", nargs="+", choices=GENERATORS, default=list(GENERATORS),
                        help="generators to run (default: all)")
    parser.add_argument("--n-expert", type=int, nargs="+", default=[35, 100])
    parser.add_argument("--no-regret", action="store_true", help="skip training every plan (condition tests only)")
    parser.add_argument("--results", type=Path, default=None,
                        help="append each run (generator, seed) to this JSON-lines file as it finishes")
    parser.add_argument("--aggregate", type=Path, nargs="+", default=None,
                        help="no runs: tabulate the runs already in these JSON-lines files (of --families)")
    parser.add_argument("--trained", type=Path, nargs="+", default=None,
                        help="reuse the plan accuracies of these --results files where generator, seed and size "
                             "match (re-runs only the condition tests)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    if args.aggregate is not None:
        reports, accuracies, seeds, sizes = load(args.aggregate, args.families)
        n_expert = list(dict.fromkeys(sizes))
    else:
        n_seeds = args.seeds or (QUICK_SEEDS if args.quick else SEEDS)
        seeds = list(range(args.seed_start, args.seed_start + n_seeds))
        sizes = [args.n_expert[i % len(args.n_expert)] for i in range(n_seeds)]
        trained = trained_accuracies(args.trained) if args.trained else None
        reports, accuracies, seeds, sizes = run(args.families, seeds, sizes, not args.no_regret, args.results, started,
                                                trained)
        n_expert = args.n_expert
    n_seeds = len(seeds)

    print(f"\nfailure rate of each check over seeds {seeds[0]}-{seeds[-1]} per generator ({N_PROXY} proxy, "
          f"{'/'.join(map(str, n_expert))} expert triples), the plans chosen, and their regret")
    print(f"{'generator':>22} " + " ".join(f"{c[:14]:>14}" for c in CHECK_NAMES[1:])
          + "  flagged  regret  avoided  plans")
    hits = {g: np.array([_hit(g, r) for r in runs], dtype=np.float64) for g, runs in reports.items()}
    regret = {g: np.array([max(a.values()) - a[r.plan] for a, r in zip(accuracies[g], reports[g], strict=True)])
              for g in reports if accuracies[g]}
    avoided = {g: np.array([a[r.plan] >= a["expert_only"] - AVOID_TOLERANCE
                            for a, r in zip(accuracies[g], reports[g], strict=True)], dtype=np.float64)
               for g in reports if accuracies[g]}
    families: dict[str, dict[str, object]] = {}
    for generator, runs in reports.items():
        failed = {c: np.mean([not _passed(r, c) for r in runs]) for c in CHECK_NAMES[1:]}
        plans = dict(Counter(r.plan for r in runs))
        row: dict[str, object] = {"satisfies": generator in SATISFYING,
                                  "flagged_rate": round(float(hits[generator].mean()), 4),
                                  "flagged_rate_ci": interval(hits[generator]), "plans": plans}
        if generator in regret:
            row.update({"regret": round(float(regret[generator].mean()), 4), "regret_ci": interval(regret[generator]),
                        "regret_max": round(float(regret[generator].max()), 4),
                        "avoidance_rate": round(float(avoided[generator].mean()), 4),
                        "avoidance_rate_ci": interval(avoided[generator]),
                        "plan_accuracy": {p: round(float(np.mean([a[p] for a in accuracies[generator]])), 4)
                                          for p in (*CANDIDATES, "refuse")}})
        families[generator] = row
        shown = f"{row.get('regret', float('nan')):>6.3f}  {row.get('avoidance_rate', float('nan')):>7.2f}"
        print(f"{generator:>22} " + " ".join(f"{failed[c]:>14.2f}" for c in CHECK_NAMES[1:])
              + f"  {hits[generator].mean():>7.2f}  {shown}  {plans}")
    print(json.dumps({**_rates(hits, regret, avoided, reports, sizes, n_expert), "seeds_per_generator": n_seeds,
                      "seed_range": [seeds[0], seeds[-1]], "n_proxy": N_PROXY, "n_expert": n_expert,
                      "seconds": round(time.perf_counter() - started, 1), "families": families}))


def _rates(hits: dict[str, np.ndarray], regret: dict[str, np.ndarray], avoided: dict[str, np.ndarray],
           reports: dict[str, list[ConditionReport]], sizes: list[int], n_expert: list[int]) -> dict[str, object]:
    """Pooled rates with intervals: detection over violating generators, false alarms over satisfying
    ones (overall and at each expert sample size), and the plan's regret and avoidance by group."""
    out: dict[str, object] = {}
    groups = {"detection_rate": [g for g in hits if g in VIOLATING],
              "false_alarm_rate": [g for g in hits if g in SATISFYING]}
    for key, gens in groups.items():
        if not gens:
            continue
        table = np.stack([hits[g] for g in gens])
        out[key], out[f"{key}_ci"] = round(float(table.mean()), 4), interval(table)
        for n in n_expert:
            cols = [i for i, s in enumerate(sizes) if s == n]
            if cols:
                out[f"{key}@{n}"] = round(float(table[:, cols].mean()), 4)
                out[f"{key}@{n}_ci"] = interval(table[:, cols])
    for label, gens in (("violating", groups["detection_rate"]), ("satisfying", groups["false_alarm_rate"])):
        gens = [g for g in gens if g in regret]
        if gens:
            out[f"plan_regret_{label}"] = round(float(np.stack([regret[g] for g in gens]).mean()), 4)
            out[f"plan_regret_{label}_ci"] = interval(np.stack([regret[g] for g in gens]))
            out[f"avoidance_rate_{label}"] = round(float(np.stack([avoided[g] for g in gens]).mean()), 4)
            out[f"avoidance_rate_{label}_ci"] = interval(np.stack([avoided[g] for g in gens]))
    return out


if __name__ == "__main__":
    main()
