"""The plan rule below the minimum expert sample, on the chat task: what choosing the adapter costs or saves.

    nice .venv/bin/python -m bench.lm_small_sample --quick        # seeds 100-103, about 5 minutes on 2 CPU cores
    nice .venv/bin/python -m bench.lm_small_sample --seeds 0 1 2 3 4 5 6 7 8 9 10 11   # the tuning seeds

Needs `make setup` (the tiny base is built here; nothing is downloaded).

Below 30 expert pairs (`TextConditionThresholds.min_expert_pairs`) the text condition tests stay undecided and
the plan rule only weighs the proxy as is against its adapter (`policies.plan_choice.SMALL_SAMPLE`). For each
seed and judge of `ingest/synthetic_judges.py` this bench trains, as bench/lm_proxy.py does on the mixture reading,
stage 1 on 2000 proxy pairs and, at each budget (default 15 / 20 / 25 expert pairs), two_stage and fine_tune from
it and expert-only DPO of the base; it scores each by the gold reward of sampled answers to held-out prompts, runs
the condition tests' cross-validation once, and compares two rules on the same evidence:

  shipped   `policies.plan_choice.choose_plan`: the adapter when its held-out log-likelihood is above the
            proxy's (by more than a tie) and it ranks more than half the held-out pairs right.
  baseline  the rule before 2026-12-01: the adapter only when the proxy is significantly worse (paired
            bootstrap, p < 0.05) and it ranks more than half right.
Either rule otherwise serves the proxy if its simplex is usable and it agrees with at least half the expert pairs,
else refuses (scored as the base model). Regret = gold of the best of proxy_as_is / two_stage / fine_tune /
expert_only / refuse minus the chosen plan's.

Last line, one JSON object:
  small_sample_regret        worst judge's mean regret under the shipped rule (gold units, range [0, 1]);
  baseline_regret            the same under the baseline rule;
  regret_difference          shipped − baseline (negative: the shipped rule loses less);
  *_ci                       95% bootstrap intervals over seeds (the difference paired; none with one seed);
  by_judge, plans            per rule: mean regret per judge, and how often each plan was chosen.
`--jsonl PATH` appends every (judge, seed, budget) record (gold per plan, held-out evidence); `--replay PATH ...`
recomputes the figures from such records without training.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.lm_proxy_parts import (  # noqa: E402
    BASE_SEED,
    PROXY_SAMPLE,
    WARMUP_STEPS,
    MixtureRunner,
    Scorer,
    Trainer,
    bootstrap,
    build_base,
    device_name,
    first_rows,
    pair_rows,
    say,
)
from ground.schemas import ConditionCheck, Plan  # noqa: E402
from ingest.synthetic_judges import make_world  # noqa: E402
from policies.lm.condition_config import TEXT_THRESHOLDS  # noqa: E402
from policies.lm.conditions import checks_and_evidence  # noqa: E402
from policies.plan_choice import (  # noqa: E402
    CHANCE_ACCURACY,
    MIN_PROXY_AGREEMENT,
    SMALL_SAMPLE,
    PlanEvidence,
    choose_plan,
    significantly_worse,
)
from workers.device import select_device  # noqa: E402
from workers.lm.mixture_features import mixture_pair_features  # noqa: E402
from workers.lm.mode_mixture_training import FrozenBase, MixtureRecipe  # noqa: E402
from workers.lm.plans import LMRecipe  # noqa: E402

JUDGES = ("relabelled", "tempered", "blind", "outside_image")
BUDGETS = (15, 20, 25)
QUICK_SEEDS = (100, 101, 102, 103)
SEEDS = tuple(range(100, 112))
N_PROXY = 2000
Record = dict[str, Any]


def capture(seed: int, judge: str, budgets: tuple[int, ...], runner: MixtureRunner, expert_only: dict[int, float],
            base_gold: float) -> list[Record]:
    """One world: stage 1, then per budget every plan's gold and the tests' checks and held-out evidence."""
    world = make_world(seed, judge)
    proxy = runner.base.encode(pair_rows(world.pairs(N_PROXY, "proxy", seed), "proxy"))
    expert = runner.base.encode(pair_rows(world.pairs(max(budgets), "expert", seed), "expert"))
    stage1 = runner.stage1(proxy, seed)
    stage1_gold = runner.score(stage1, world, seed)["gold"]
    beta = runner.recipe.beta
    expert_features = mixture_pair_features(stage1, expert, runner.base.head, beta)
    proxy_features = mixture_pair_features(stage1, proxy.take(slice(0, PROXY_SAMPLE)), runner.base.head, beta)
    records = []
    for n in budgets:
        gold = {"proxy_as_is": stage1_gold, "refuse": base_gold, "expert_only": expert_only[n],
                "two_stage": runner.score(runner.two_stage(stage1, expert, n, seed), world, seed)["gold"],
                "fine_tune": runner.score(runner.fine_tune(stage1, expert, n, seed), world, seed)["gold"]}
        checks, evidence, _ = checks_and_evidence(first_rows(expert_features, n), proxy_features, seed, TEXT_THRESHOLDS,
                                                  {})
        records.append({"judge": judge, "seed": seed, "n": n, "gold": gold,
                        "checks": {c.name: c.passed for c in checks}, "agreement": evidence.proxy_agreement,
                        "ll": {k: v.tolist() for k, v in evidence.heldout_ll.items()},
                        "correct": {k: v.tolist() for k, v in evidence.heldout_correct.items()}})
    return records


def _evidence(record: Record) -> PlanEvidence:
    return PlanEvidence(record["agreement"], {k: np.array(v) for k, v in record["ll"].items()},
                        {k: np.array(v) for k, v in record["correct"].items()}, record["seed"])


def shipped_rule(record: Record) -> Plan:
    checks = [ConditionCheck(name=k, passed=v, statistic=0.0, threshold=0.0, detail="")
              for k, v in record["checks"].items()]
    return choose_plan(checks, _evidence(record))[0]


def baseline_rule(record: Record) -> Plan:
    """The small-sample rule before 2026-12-01: the adapter only when the proxy is significantly worse."""
    evidence = _evidence(record)
    if not record["checks"]["low_dimensional_encoding"]:
        return "refuse"
    if all(c in evidence.heldout_ll for c in SMALL_SAMPLE):
        worse, _ = significantly_worse(evidence.heldout_ll["proxy_as_is"], evidence.heldout_ll["two_stage"],
                                       np.random.default_rng(evidence.seed))
        if worse and float(evidence.heldout_correct["two_stage"].mean()) > CHANCE_ACCURACY:
            return "two_stage"
    agreement = evidence.proxy_agreement
    return "proxy_as_is" if agreement is None or agreement >= MIN_PROXY_AGREEMENT else "refuse"


def figures(records: list[Record]) -> dict[str, Any]:
    rules: dict[str, Callable[[Record], Plan]] = {"shipped": shipped_rule, "baseline": baseline_rule}
    regret: dict[str, dict[tuple[str, int], list[float]]] = {name: {} for name in rules}
    plans: dict[str, dict[str, int]] = {name: {} for name in rules}
    for name, rule in rules.items():
        for r in records:
            plan = rule(r)
            regret[name].setdefault((r["judge"], r["seed"]), []).append(max(r["gold"].values()) - r["gold"][plan])
            plans[name][plan] = plans[name].get(plan, 0) + 1
    judges = sorted({j for j, _ in regret["shipped"]})
    seeds = sorted({s for _, s in regret["shipped"]})

    def worst(name: str, chosen: Any) -> float:
        return max(float(np.mean([x for s in chosen for x in regret[name][(j, s)]])) for j in judges)

    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    for key, name in (("small_sample_regret", "shipped"), ("baseline_regret", "baseline")):
        out[key] = round(worst(name, seeds), 4)
        out[f"{key}_ci"] = bootstrap(lambda chosen, name=name: worst(name, chosen), seeds, rng)
    out["regret_difference"] = round(out["small_sample_regret"] - out["baseline_regret"], 4)
    out["regret_difference_ci"] = bootstrap(lambda chosen: worst("shipped", chosen) - worst("baseline", chosen), seeds,
                                            rng)  # paired: both rules on each resample
    out["by_judge"] = {name: {j: round(float(np.mean([x for s in seeds for x in regret[name][(j, s)]])), 4)
                              for j in judges} for name in rules}
    out["plans"] = plans
    out["seeds"] = seeds
    out["budgets"] = sorted({r["n"] for r in records})
    out["runs"] = len(records)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"seeds {list(QUICK_SEEDS)}")
    parser.add_argument("--seeds", type=int, nargs="+", help=f"default {SEEDS[0]}-{SEEDS[-1]} (tuning used 0-11)")
    parser.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS), help="expert pairs, 12-29")
    parser.add_argument("--judges", nargs="+", default=list(JUDGES), help="judge kinds")
    parser.add_argument("--jsonl", type=Path, help="append every captured record here")
    parser.add_argument("--replay", type=Path, nargs="+", help="figures from captured records; nothing is trained")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.replay:
        records = [json.loads(line) for path in args.replay for line in path.read_text().splitlines() if line]
        print(json.dumps({**figures(records), "replayed": [str(p) for p in args.replay]}))
        return
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    seeds = list(args.seeds or (QUICK_SEEDS if args.quick else SEEDS))
    budgets = tuple(sorted(args.budgets))
    low, high = TEXT_THRESHOLDS.min_adapter_pairs, TEXT_THRESHOLDS.min_expert_pairs
    if not all(low <= n < high for n in budgets):
        parser.error(f"--budgets {list(budgets)}: this bench is about {low} <= n < {high} expert pairs")
    device = select_device(None)
    work = Path(tempfile.mkdtemp(prefix="lm-small-sample-"))
    world0 = make_world(BASE_SEED, "tempered")  # the base's corpus and chats; gold is the same in every world
    base = build_base("tiny", work, world0, WARMUP_STEPS)
    trainer = Trainer(work, base, LMRecipe())
    scorer = Scorer.for_base(base, world0, 40, 40, str(device))
    runner = MixtureRunner(FrozenBase.load(base), MixtureRecipe(), scorer)
    records: list[Record] = []
    for seed in seeds:
        base_gold = scorer.score(base, world0, seed)["gold"]
        expert = make_world(seed, args.judges[0]).pairs(max(budgets), "expert", seed)
        expert_only = {}
        for n in budgets:  # the expert pairs and the gold reward do not depend on the judge
            data = trainer.dataset(f"expert-{seed}-{n}", pair_rows(expert[:n], "expert"))
            expert_only[n] = scorer.score(trainer.train("expert_only", f"expert_only-{seed}-{n}", data, seed=seed)[0],
                                          world0, seed)["gold"]
        for judge in args.judges:
            found = capture(seed, judge, budgets, runner, expert_only, base_gold)
            records += found
            if args.jsonl:
                with args.jsonl.open("a") as out:
                    out.writelines(json.dumps(r) + "\n" for r in found)
            plans = [(r["n"], shipped_rule(r), baseline_rule(r)) for r in found]
            say(f"seed {seed} {judge}: plans (n, shipped, baseline) {plans}", started)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({**figures(records), "device": device_name(device), "model": "tiny", "judges": args.judges,
                      "n_proxy": N_PROXY, "date": date.today().isoformat(),
                      "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
