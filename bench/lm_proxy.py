"""Language-model bench of paper 1's proxy feedback: which plan wins on a chat task with a known gold reward.

    nice .venv/bin/python -m bench.lm_proxy --quick          # tiny model on CPU, under 15 minutes
    nice .venv/bin/python -m bench.lm_proxy                   # SmolLM2-135M (GPU when present), all judges

Needs `make setup` (`--quick`, the tiny model); the full run on SmolLM2 needs `make models`.
Nothing is downloaded: the tiny base is built here from the task's vocabulary.

Task (ingest/synthetic_judges.py): prompts ask about a theme, answers are 4–6 words, and the gold
reward of an answer is its share of words on the theme's topic (range [0, 1]). Proxy judges:
`relabelled` and `tempered` satisfy paper 1's conditions (a permuted criterion; the right criterion
with noisy labels), `blind` and `outside_image` violate them. For each reporting seed and judge the
bench trains, as the retrain flow does (workers/lm/plans.py, workers/lm/mode_mixture_training.py), stage 1
(the proxy-only policy) and, for each expert-pair budget, two-stage and fine-tune from it, expert-only DPO of
the base, and pooled DPO (proxy + expert pairs at equal weight: proxyloop's behaviour before the text
condition tests); the condition tests run on the stage-1 model at each budget and choose a plan, whose score
is the score of the policy that plan trains (stage 1 for proxy_as_is; `refuse` releases nothing and is scored
as the base model). Every policy is scored by the mean gold reward of sampled answers (temperature 1) to
held-out prompts whose phrasing no training pair uses. `--reading` (default `mixture`, the worker's default)
picks paper 1's reading: the sequence-level mode mixture over the frozen base (stage 1, two-stage and
fine-tune are the mixture's, trained in process with the worker's functions), or the per-token simplex
bottleneck (every policy trained through the worker's `run_lm_training`).

Headline figures (last line, one JSON object):
  lm_expert_multiple     expert pairs expert-only DPO needs to reach two-stage's score at 50 expert
                         pairs, over 50; interpolated in log n between budgets. Per satisfying judge,
                         headline = the smaller (conservative). Reported as a lower bound (flag
                         `lm_expert_multiple_is_lower_bound`) when expert-only never gets there, and as
                         an upper bound (`..._is_upper_bound`) when it is already there at the smallest budget.
  lm_plan_regret         mean over budgets and seeds of (best of proxy_as_is / two_stage / fine_tune /
                         expert_only / refuse − the chosen plan), in units of the gold range; refuse counts
                         as the base model, so refusing when every trained plan is worse than the base
                         costs nothing (and is never a negative regret); headline = the worst judge
                         (max), per judge under `lm_plan_regret_by_judge`.
  lm_violation_detected  share of (seed, budget) runs of violating judges where a paper condition check
                         failed (checks left undecided below the minimum expert sample do not count) or
                         the plan avoids the proxy (expert_only or refuse).
Intervals (`*_ci`) are 95% bootstrap intervals over seeds.

Seeds: the recipe (workers.lm.plans.LMRecipe defaults: β, learning rates, epochs) and the base's warm-up
were chosen in short sweeps on tuning seeds 0 and 1; figures are reported on seeds 100 and up (`--seeds`).
`--recipe-json` overrides LMRecipe fields for sweeps (e.g. '{"stage1_parts": "bottleneck"}'); the mixture's
recipe is workers.lm.mode_mixture_training.MixtureRecipe's defaults (tuning seeds 0-1), and the condition
tests' mixture settings were chosen on tuning seeds 0-5 (docs/design.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
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
    Context,
    JudgeRun,
    MixtureRunner,
    Planner,
    Scorer,
    Trainer,
    bootstrap,
    build_base,
    crossing,
    device_name,
    pair_rows,
    say,
)
from ingest.synthetic_judges import GOLD_MAX, GOLD_MIN, SATISFYING, VIOLATING, make_world  # noqa: E402
from policies.plan_choice import PAPER_CONDITIONS  # noqa: E402
from workers.device import select_device  # noqa: E402
from workers.lm.mode_mixture_training import FrozenBase, MixtureRecipe  # noqa: E402
from workers.lm.plans import LMRecipe, Recipe  # noqa: E402

BUDGETS = (20, 50, 100, 300)
REFERENCE_BUDGET = 50  # lm_expert_multiple: expert-only against two-stage at this many expert pairs
READINGS = ("bottleneck", "mixture")  # policies/lm/simplex_bottleneck.py, policies/lm/mode_mixture.py
TARGETS = {"lm_expert_multiple": (">=", 4.0), "lm_plan_regret": ("<=", 0.02), "lm_violation_detected": (">=", 0.8)}


@dataclass(frozen=True)
class Preset:
    judges: tuple[str, ...]
    seeds: tuple[int, ...]
    n_proxy: int
    extra_expert_budgets: tuple[int, ...]  # expert-only only: where lm_expert_multiple may cross
    model: str


QUICK = Preset(("relabelled", "tempered", "blind"), (100, 101), 2000, (600,), "tiny")
FULL = Preset(("relabelled", "tempered", "blind", "outside_image"), (100, 101, 102, 103, 104), 4000, (600, 1000),
              "smollm2")
# SmolLM2 needs far smaller steps than the tiny model (workers/lm/plans.py). Expert learning rate: of 1e-5 and 1e-4
# (tuning seed 0, relabelled, 50 expert pairs, warmed-up base 0.209), 1e-4 (gold 0.378; 1e-5: 0.229); the proxy
# learning rate (pooled, the bottleneck's stage 1) is not tuned.
SMOLLM2_RECIPE = {"proxy_learning_rate": 1e-5, "expert_learning_rate": 1e-4}
TUNING_SEEDS = [0, 1]  # the recipe sweeps (workers.lm.plans.LMRecipe defaults, WARMUP_STEPS)


def run_judge(judge: str, seed: int, ctx: Context, expert_only: dict[int, float]) -> JudgeRun:
    """Stage 1 once, then every budget's policies and the plan the condition tests choose."""
    world = make_world(seed, judge)
    proxy = world.pairs(ctx.n_proxy, "proxy", seed)
    expert = world.pairs(max(ctx.budgets), "expert", seed)  # budgets are prefixes: nested samples
    trainer, mixture = ctx.trainer, ctx.mixture
    proxy_data = trainer.dataset(f"proxy-{judge}-{seed}-{ctx.n_proxy}", pair_rows(proxy, "proxy"))
    if mixture is not None:  # every proxy-side plan is the mixture's, trained in process over the frozen base
        started = time.perf_counter()
        expert_encoded = mixture.base.encode(pair_rows(expert, "expert"))
        proxy_encoded = mixture.base.encode(pair_rows(proxy, "proxy"))
        mixture_stage1 = mixture.stage1(proxy_encoded, seed)
        run = JudgeRun(judge, seed, mixture.score(mixture_stage1, world, seed))
        planner = Planner.from_mixture(mixture, mixture_stage1, expert_encoded, proxy_encoded, ctx.n_proxy,
                                       mixture.recipe.beta)
        seconds = time.perf_counter() - started
    else:
        stage1, seconds = trainer.train("stage1", f"{judge}-{seed}-stage1", proxy_data, seed=seed)
        run = JudgeRun(judge, seed, ctx.scorer.score(stage1, world, seed))
        planner = Planner.from_models(stage1, trainer.base, pair_rows(expert, "expert"),
                                      pair_rows(proxy[:PROXY_SAMPLE], "proxy"), ctx.n_proxy, trainer.recipe.beta,
                                      ctx.device)
    say(f"{judge} seed {seed}: stage 1 ({seconds:.0f} s) gold {run.stage1['gold']:.3f} "
        f"proxy {run.stage1['proxy']:.3f}", ctx.started)
    run.scores["expert_only"] = {n: expert_only[n] for n in ctx.budgets}
    for n in ctx.budgets:
        expert_data = trainer.dataset(f"expert-{seed}-{n}", pair_rows(expert[:n], "expert"))
        pooled_data = trainer.dataset(f"pooled-{judge}-{seed}-{ctx.n_proxy}-{n}",
                                      pair_rows(expert[:n], "expert") + pair_rows(proxy, "proxy"))
        line = []
        steps: tuple[tuple[Recipe, Path | None, Path], ...] = (("pooled", None, pooled_data),)
        if mixture is not None:
            for name, train in (("two_stage", mixture.two_stage), ("fine_tune", mixture.fine_tune)):
                run.scores.setdefault(name, {})[n] = mixture.score(
                    train(mixture_stage1, expert_encoded, n, seed), world, seed)["gold"]
                line.append(f"{name} (mixture) {run.scores[name][n]:.3f}")
        else:
            steps = (("two_stage", stage1, expert_data), ("fine_tune", stage1, expert_data), *steps)
        for name, start, data in steps:
            path, seconds = trainer.train(name, f"{judge}-{seed}-{name}-{n}", data, start, seed=seed)
            run.scores.setdefault(name, {})[n] = ctx.scorer.score(path, world, seed)["gold"]
            line.append(f"{name} {run.scores[name][n]:.3f} ({seconds:.0f} s)")
        report = planner.report(n, f"{judge}-{seed}-{n}", seed)
        run.plans[n] = report.plan
        run.failed[n] = [c.name for c in report.checks if c.name in PAPER_CONDITIONS and not c.passed
                         and not c.detail.startswith("undecided")]
        say(f"{judge} seed {seed} n={n}: {', '.join(line)}, expert_only {expert_only[n]:.3f}; plan {report.plan}"
            f" (failed: {', '.join(run.failed[n]) or 'none'})", ctx.started)
    return run


# ---------------------------------------------------------------------------------------------- figures


def expert_multiple(runs: list[JudgeRun], expert_curves: dict[int, dict[int, float]]) -> tuple[float, str]:
    seeds = sorted({r.seed for r in runs})
    curve = {n: float(np.mean([expert_curves[s][n] for s in seeds])) for n in expert_curves[seeds[0]]}
    target = float(np.mean([r.scores["two_stage"][REFERENCE_BUDGET] for r in runs]))
    n, kind = crossing(curve, target)
    return n / REFERENCE_BUDGET, kind


def regret(run: JudgeRun, base: float) -> list[float]:
    span = GOLD_MAX - GOLD_MIN
    return [(max(run.candidates(n, base).values()) - run.plan_score(n, run.plans[n], base)) / span for n in run.plans]


def detected(run: JudgeRun) -> list[bool]:
    return [bool(run.failed[n]) or run.plans[n] in ("expert_only", "refuse") for n in run.plans]


def figures(runs: list[JudgeRun], expert_curves: dict[int, dict[int, float]], base: float) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    seeds = sorted({r.seed for r in runs})
    judges = sorted({r.judge for r in runs})

    def of(judge: str, chosen: list[int]) -> list[JudgeRun]:  # a resample's runs (repeats kept)
        return [r for s in chosen for r in runs if r.judge == judge and r.seed == s]

    satisfying = [j for j in judges if j in SATISFYING]
    violating = [j for j in judges if j in VIOLATING]
    out: dict[str, Any] = {}
    multiples = {j: expert_multiple(of(j, seeds), expert_curves) for j in satisfying}
    if multiples:
        judge = min(multiples, key=lambda j: multiples[j][0])
        value, kind = multiples[judge]
        out["lm_expert_multiple"] = round(value, 3)
        out["lm_expert_multiple_is_lower_bound"] = kind == "at_least"
        out["lm_expert_multiple_is_upper_bound"] = kind == "at_most"
        out["lm_expert_multiple_judge"] = judge
        out["lm_expert_multiple_by_judge"] = {j: {"multiple": round(v, 3), "bound": k} for j, (v, k) in
                                              multiples.items()}
        out["lm_expert_multiple_ci"] = bootstrap(
            lambda s: min(expert_multiple(of(j, s), expert_curves)[0] for j in satisfying), seeds, rng)

    def worst_regret(chosen: list[int]) -> float:
        return max(float(np.mean([x for r in of(j, chosen) for x in regret(r, base)])) for j in judges)

    by_judge = {j: round(float(np.mean([x for r in of(j, seeds) for x in regret(r, base)])), 4) for j in judges}
    out["lm_plan_regret"] = round(worst_regret(seeds), 4)
    out["lm_plan_regret_by_judge"] = by_judge
    out["lm_plan_regret_ci"] = bootstrap(worst_regret, seeds, rng)
    if violating:
        def detection(chosen: list[int]) -> float:
            return float(np.mean([x for j in violating for r in of(j, chosen) for x in detected(r)]))

        out["lm_violation_detected"] = round(detection(seeds), 4)
        out["lm_violation_detected_ci"] = bootstrap(detection, seeds, rng)
    out["targets_met"] = {k: (out[k] >= bound if op == ">=" else out[k] <= bound) for k, (op, bound) in TARGETS.items()
                          if k in out}
    return out


def judge_table(runs: list[JudgeRun], base: float) -> dict[str, Any]:
    """Per judge: mean gold score of each policy per budget, the plans chosen, regret and detection by budget."""
    table: dict[str, Any] = {}
    for judge in sorted({r.judge for r in runs}):
        mine = [r for r in runs if r.judge == judge]
        budgets = sorted(mine[0].plans)
        policies: dict[str, Any] = {
            p: {str(n): round(float(np.mean([r.scores[p][n] for r in mine])), 4) for n in budgets}
            for p in ("expert_only", "pooled", "fine_tune", "two_stage")}
        policies["proxy_as_is"] = round(float(np.mean([r.stage1["gold"] for r in mine])), 4)
        policies["chosen_plan"] = {str(n): round(float(np.mean([r.plan_score(n, r.plans[n], base) for r in mine])), 4)
                                   for n in budgets}
        table[judge] = {
            "kind": "satisfying" if judge in SATISFYING else "violating",
            "gold": policies,
            "stage1_proxy_reward": round(float(np.mean([r.stage1["proxy"] for r in mine])), 4),
            "plans": {str(n): [r.plans[n] for r in mine] for n in budgets},
            "failed_checks": {str(n): [r.failed[n] for r in mine] for n in budgets},
            "regret": {str(n): round(float(np.mean([regret(r, base)[i] for r in mine])), 4)
                       for i, n in enumerate(budgets)},
            "detected": ({str(n): float(np.mean([detected(r)[i] for r in mine])) for i, n in enumerate(budgets)}
                         if judge in VIOLATING else None),
        }
    return table


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model on CPU, 3 judges, 2 seeds, 2000 proxy pairs")
    parser.add_argument("--seeds", type=int, nargs="+", help="reporting seeds (default 100.., tuning used 0–4)")
    parser.add_argument("--judges", nargs="+", help="judge kinds (ingest.synthetic_judges.JUDGE_KINDS)")
    parser.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS), help="expert-pair budgets")
    parser.add_argument("--n-proxy", type=int, help="proxy pairs per world")
    parser.add_argument("--model", choices=("tiny", "smollm2"), help="base model (quick: tiny; full: smollm2)")
    parser.add_argument("--recipe-json", default="{}", help="overrides of LMRecipe fields, e.g. '{\"beta\": 0.5}'")
    parser.add_argument("--prompts", type=int, default=40, help="held-out prompts scored per policy")
    parser.add_argument("--samples", type=int, default=40, help="sampled answers per held-out prompt")
    parser.add_argument("--base-warmup-steps", type=int, default=WARMUP_STEPS, help="SFT steps of the tiny base")
    parser.add_argument("--reading", choices=READINGS, default="mixture",
                        help="the two-stage reading: per-token bottleneck, or the sequence-level mode mixture")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--work-dir", type=Path, help="keep (and reuse) runs here instead of a temporary directory")
    args = parser.parse_args()
    preset = QUICK if args.quick else FULL
    if REFERENCE_BUDGET not in args.budgets:
        parser.error(f"--budgets must include {REFERENCE_BUDGET} (lm_expert_multiple's reference)")
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    started = time.perf_counter()
    model = args.model or preset.model
    seeds = list(args.seeds or preset.seeds)
    judges = list(args.judges or preset.judges)
    n_proxy = args.n_proxy or preset.n_proxy
    budgets = tuple(sorted(args.budgets))
    overrides = json.loads(args.recipe_json)
    recipe = LMRecipe(**{**(SMOLLM2_RECIPE if model == "smollm2" else {}), **overrides})
    device = select_device(None)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="lm-proxy-"))
    work.mkdir(parents=True, exist_ok=True)
    say(f"lm_proxy: {model} on {device_name(device)}; judges {judges}, seeds {seeds}, budgets {list(budgets)}, "
        f"{n_proxy} proxy pairs; work dir {work}", started)

    world0 = make_world(BASE_SEED, "tempered")  # the base's corpus and chats; gold is the same in every world
    base = build_base(model, work, world0, args.base_warmup_steps)
    trainer = Trainer(work, base, recipe)
    scorer = Scorer.for_base(base, world0, args.prompts, args.samples, str(device))
    mixture = MixtureRunner(FrozenBase.load(base), MixtureRecipe(), scorer) if args.reading == "mixture" else None
    ctx = Context(trainer, scorer, budgets, n_proxy, str(device), started, mixture)
    base_score = float(np.mean([scorer.score(base, world0, seed)["gold"] for seed in seeds]))
    # The scorer's own noise: one policy (the base) scored under different sampling seeds. Regret takes a max
    # over plans, so this noise inflates it; 40 samples per prompt (4 before) cut it from 0.012 to 0.005.
    scoring_sd = float(np.std([scorer.score(base, world0, 1000 + s)["gold"] for s in range(4)], ddof=1))
    say(f"base model ready: gold {base_score:.3f} (scoring sd {scoring_sd:.4f})", started)

    expert_budgets = tuple(sorted({*budgets, *preset.extra_expert_budgets}))
    expert_curves: dict[int, dict[int, float]] = {}
    runs: list[JudgeRun] = []
    for seed in seeds:
        expert = make_world(seed, judges[0]).pairs(max(expert_budgets), "expert", seed)
        expert_curves[seed] = {}
        for n in expert_budgets:  # the expert pairs and the gold reward do not depend on the judge
            data = trainer.dataset(f"expert-{seed}-{n}", pair_rows(expert[:n], "expert"))
            path, seconds = trainer.train("expert_only", f"expert_only-{seed}-{n}", data, seed=seed)
            expert_curves[seed][n] = scorer.score(path, world0, seed)["gold"]
            say(f"seed {seed}: expert_only n={n} gold {expert_curves[seed][n]:.3f} ({seconds:.0f} s)", started)
        for judge in judges:
            runs.append(run_judge(judge, seed, ctx, expert_curves[seed]))

    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)  # a temporary work dir goes with the run
    headline = figures(runs, expert_curves, base_score)
    seconds = time.perf_counter() - started
    missed = [k for k, ok in headline["targets_met"].items() if not ok]
    print(f"\ntargets: {json.dumps(headline['targets_met'])}; missed: {missed or 'none'}; {seconds:.0f} s")
    print(json.dumps({
        **headline,
        "judges": judge_table(runs, base_score),
        "expert_only_curve": {str(n): round(float(np.mean([expert_curves[s][n] for s in seeds])), 4)
                              for n in expert_budgets},
        "base_gold": round(base_score, 4),
        "gold_range": [GOLD_MIN, GOLD_MAX],
        "device": device_name(device), "model": model, "quick": args.quick, "seeds": seeds,
        "tuning_seeds": TUNING_SEEDS, "budgets": list(budgets), "n_proxy": n_proxy,
        "scoring": {"heldout_prompts": args.prompts, "samples_per_prompt": args.samples, "temperature": 1.0,
                    "max_new_tokens": scorer.max_new_tokens, "gold_sd_between_sampling_seeds": round(scoring_sd, 4)},
        "recipe": asdict(recipe), "reading": args.reading,
        "mixture_recipe": asdict(mixture.recipe) if mixture else None, "date": date.today().isoformat(),
        "seconds": round(seconds, 1),
        "train_seconds": round(sum(r["seconds"] for r in trainer.log), 1), "training_runs": len(trainer.log),
    }))


if __name__ == "__main__":
    main()
