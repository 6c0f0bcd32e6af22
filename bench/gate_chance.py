"""Does the gate's test against a coin (policies/gate_chance.py) stop chance-level releases, and at what cost?

    nice .venv/bin/python -m bench.gate_chance [--quick] [--seeds 12] [--seed-start 100]

Needs `make setup` only (CPU; feature-vector policies). Each run is the feature family's retrain path with the
worker's recipe: the condition tests choose the plan (`run_condition_tests`, as flows/retrain.check_conditions), the
training worker trains it (`train_feature_policy`, its checkpoints), the evaluation task's measurements on the
held-out third of the expert triples (`split_expert`; `evaluate_checkpoint` and the expert-only baseline), then the
gate twice on those same evaluations: **baseline** the default rules (`chance_alpha` 1: the test reported, not
applied; the minimum of distinct held-out tasks applies to both), **tested** the test applied at α 0.05. What is
released is scored by gold ranking accuracy on 5000 fresh inputs; a block serves nothing, scored as a coin's 0.5
(a first release: nothing was serving).

Generators: "ok" (the demo's world, a proxy satisfying the conditions), "family_tempered" (satisfying), and
"noise": the "ok" world's proxy triples with winner and loser swapped at random, a judge that knows nothing.
Expert budgets 15, 20, 30 and 45 triples: 5 to 15 held-out tasks, where the test matters; seeds split evenly over
budgets. α 0.05 is the convention, not tuned; every figure is on reporting seeds (100 and up), with 95% bootstrap
intervals over seeds (`*_ci`).

Headline keys: `chance_level_release_rate` (runs releasing a policy with gold accuracy below 0.55, baseline vs
tested), `good_release_blocked_rate` (runs whose baseline release has gold accuracy 0.65 or more that the test
blocks), `served_accuracy` (mean gold accuracy of what serves after the gate, block = 0.5) and
`served_accuracy_gain` (tested minus baseline, paired). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from bench.conditions_power import N_TEST, gold_accuracy, interval, snapshot
from ground.schemas import FeatureTriple, TrainingRequest
from ingest.store import split_expert
from policies.features.conditions import run_condition_tests
from policies.features.outputs import output_support
from policies.loader import load_policy_dir
from policies.promotion import GateRules, decide
from workers.features.evaluate import evaluate_checkpoint, expert_only_baseline, heldout_inputs
from workers.features.tasks import train_feature_policy

GENERATORS = ("ok", "family_tempered", "noise")
BUDGETS = (15, 20, 30, 45)
SEED_START, QUICK_SEEDS, SEEDS = 100, 2, 12
CHANCE_LEVEL, GOOD = 0.55, 0.65
BASELINE_RULES = GateRules(indicators="not_applicable")  # the default: the test reported, not applied
TESTED_RULES = GateRules(indicators="not_applicable", chance_alpha=0.05)


def noisy(proxy: Sequence[FeatureTriple], seed: int) -> list[FeatureTriple]:
    """The proxy's triples with winner and loser swapped by a fair coin each: labels that carry nothing."""
    swap = np.random.default_rng([seed, 31]).random(len(proxy)) < 0.5
    return [t.model_copy(update={"y_w": t.y_l, "y_l": t.y_w}) if s else t for t, s in zip(proxy, swap, strict=True)]


def one_run(generator: str, seed: int, n_expert: int) -> dict[str, Any]:
    """Plan, train, evaluate and gate one snapshot; the gold accuracy each gate serves."""
    expert, proxy, _, gold = snapshot("ok" if generator == "noise" else generator, seed, n_expert)
    if generator == "noise":
        proxy = noisy(proxy, seed)
    report = run_condition_tests(expert, proxy, "bench", seed=0)
    record: dict[str, Any] = {"generator": generator, "seed": seed, "n_expert": n_expert, "plan": report.plan}
    if report.plan == "refuse":
        return record | {"baseline": 0.5, "tested": 0.5, "released": {"baseline": False, "tested": False}}
    expert_train, heldout = split_expert(expert)
    x = np.random.default_rng([seed, 7]).standard_normal((N_TEST, len(expert[0].x)))
    with tempfile.TemporaryDirectory() as out_dir:
        request = TrainingRequest(run_id="bench", snapshot_id="bench", store_url="sqlite://", plan=report.plan,
                                  output_dir=out_dir, seed=0)
        result = train_feature_policy(request, proxy, expert_train, torch.device("cpu"), "bench", lambda _: None,
                                      heldout)
        evaluations = [evaluate_checkpoint(ref, heldout) for ref in result.checkpoints]
        support = output_support(expert, proxy)
        baseline = expert_only_baseline(support.dense(expert_train), support.dense(heldout), support.n_fitted, 0)
        gold_by_step = {}
        for ref in result.checkpoints:
            with torch.no_grad():
                lp = load_policy_dir(ref.path).log_probs(torch.tensor(x, dtype=torch.float32))  # type: ignore
            gold_by_step[ref.step] = gold_accuracy(lp.double().numpy(), gold(x))
    served, released = {}, {}
    for arm, rules in (("baseline", BASELINE_RULES), ("tested", TESTED_RULES)):
        decision = decide(evaluations, baseline, rules)
        released[arm] = decision.decision != "block" and heldout_inputs(heldout) >= rules.min_heldout_inputs
        assert decision.checkpoint is not None
        served[arm] = gold_by_step[decision.checkpoint.step] if released[arm] else 0.5
        record[f"{arm}_reason"] = decision.reasons[-1]
    return record | served | {"released": released, "n_heldout": len(heldout),
                              "pick_gold": gold_by_step[decide(evaluations, baseline, BASELINE_RULES).checkpoint.step]}  # type: ignore[union-attr]


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rates and means over runs (pooled over generators), with bootstrap intervals resampling seeds."""
    seeds = sorted({r["seed"] for r in runs})

    def by_seed(value: Any) -> np.ndarray:  # [1, seeds]: each seed's mean of `value` over its runs
        return np.array([[np.mean([value(r) for r in runs if r["seed"] == s] or [0.0]) for s in seeds]])

    def chance_level(arm: str) -> Any:
        return lambda r: float(r["released"][arm] and r[arm] < CHANCE_LEVEL)

    def good_blocked(r: dict[str, Any]) -> float:
        return float(r["released"]["baseline"] and r["baseline"] >= GOOD and not r["released"]["tested"])

    out: dict[str, Any] = {}
    for key, values in (
        ("chance_level_release_rate", {a: chance_level(a) for a in ("baseline", "tested")}),
        ("served_accuracy", {a: (lambda r, a=a: r[a]) for a in ("baseline", "tested")}),
    ):
        out[key] = {a: round(float(by_seed(v).mean()), 4) for a, v in values.items()}
        out[f"{key}_ci"] = {a: interval(by_seed(v)) for a, v in values.items()}
    good = [r for r in runs if r["released"]["baseline"] and r["baseline"] >= GOOD]
    out["good_release_blocked_rate"] = round(float(np.mean([good_blocked(r) for r in good])), 4) if good else None
    out["good_releases"] = len(good)
    gain = by_seed(lambda r: r["tested"] - r["baseline"])
    out["served_accuracy_gain"], out["served_accuracy_gain_ci"] = round(float(gain.mean()), 4), interval(gain)
    return out


def per_budget_seeds(argv: Sequence[str] | None, doc: str) -> tuple[int, int]:
    """(seeds per budget, first seed) from the command line both gate-chance benches take."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SEEDS} seeds per budget")
    parser.add_argument("--seeds", type=int, default=None, help=f"seeds per budget (default {SEEDS})")
    parser.add_argument("--seed-start", type=int, default=SEED_START)
    args = parser.parse_args(argv)
    return args.seeds or (QUICK_SEEDS if args.quick else SEEDS), args.seed_start


def run_grid(one: Callable[[str, int, int], dict[str, Any]], generators: Sequence[str], per_budget: int,
             seed_start: int) -> list[dict[str, Any]]:
    """`one(generator, seed, n_expert)` over budgets × seeds × generators (a seed's generators share it), each run
    printed as it ends."""
    started, runs, seed = time.perf_counter(), [], seed_start
    for n_expert in BUDGETS:
        for _ in range(per_budget):
            for generator in generators:
                run = one(generator, seed, n_expert)
                runs.append(run)
                print(f"[{time.perf_counter() - started:6.0f}s] {generator:16s} seed {seed} n {n_expert}: plan "
                      f"{run['plan']}, served baseline {run['baseline']:.3f} tested {run['tested']:.3f} "
                      f"({run.get('tested_reason', 'refused')[:90]})", flush=True)
            seed += 1
    return runs


def report(runs: list[dict[str, Any]], generators: Sequence[str], started: float, quick: bool,
           **extra: object) -> dict[str, Any]:
    """The headline JSON: pooled figures, each generator's, and what the run was."""
    return {**summarise(runs), "families": {g: summarise([r for r in runs if r["generator"] == g]) for g in generators},
            "generators": list(generators), "budgets": list(BUDGETS), "seeds": sorted({r["seed"] for r in runs}),
            "runs": len(runs), "alpha": TESTED_RULES.chance_alpha, **extra, "device": "cpu",
            "date": time.strftime("%Y-%m-%d"), "seconds": round(time.perf_counter() - started, 1), "quick": quick}


def main(argv: Sequence[str] | None = None) -> None:
    per_budget, seed_start = per_budget_seeds(argv, __doc__ or "")
    torch.set_num_threads(1)
    started = time.perf_counter()
    runs = run_grid(one_run, GENERATORS, per_budget, seed_start)
    print(json.dumps(report(runs, GENERATORS, started, quick=per_budget == QUICK_SEEDS)))


if __name__ == "__main__":
    main()
