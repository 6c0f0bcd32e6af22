"""The gate's test against a coin on the chat family, where the text audit saw noise proxies released.

    nice .venv/bin/python -m bench.gate_chance_chat [--quick] [--seeds 6] [--seed-start 100]

Needs `make setup` only (the tiny local base model, built on first use under a temporary home; CPU). Each run is
the chat retrain path of flows/retrain.py in one process, with its real stages: the snapshot's JSONL files
(`write_snapshot_datasets`, from a SQLite store), stage 1 in the default mixture reading, paper 1's text condition
tests and the plan they choose, the plan's training, the evaluation of every checkpoint on the held-out expert pairs
(`evaluate_lm_checkpoints`), then the gate twice on the same evaluations as bench/gate_chance.py does: **baseline**
the default rules (the test reported, not applied) and **tested** the test applied at α 0.05. Both apply the
minimum of distinct held-out tasks (`too_little_heldout`), as the flow's gate task does.

The chat task is ingest/synthetic_chat.py's (sums and capitals; gold prefers the right answer, politely).
Generators: "judge85", a proxy judge agreeing with gold on 85 % of pairs (the demo's); "noise", one agreeing on
50 % (its choices a coin). Expert budgets 15, 20, 30 and 45 pairs. What serves is scored by gold accuracy: the
share of 300 fresh gold-labelled pairs its implicit reward ranks right (ties half); a block serves the base model,
whose implicit reward is zero, so it scores 0.5. Reporting seeds 100 and up; `*_ci` are 95 % bootstrap intervals
over seeds. Keys as bench/gate_chance.py's. The last line printed is one JSON object.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from bench.gate_chance import (  # noqa: E402
    BASELINE_RULES,
    QUICK_SEEDS,
    TESTED_RULES,
    per_budget_seeds,
    report,
    run_grid,
)
from ground.schemas import CheckpointRef, ExpertLabel, PairwiseText, ProxyPreference, TextConditionRequest  # noqa: E402
from ingest.store import freeze_snapshot, make_engine  # noqa: E402
from ingest.synthetic_chat import chat_preferences  # noqa: E402
from ingest.upsert import upsert_events  # noqa: E402
from policies.lm.gate import decide_language_model  # noqa: E402
from policies.promotion import GateRules, too_little_heldout  # noqa: E402
from workers.lm.base_model import ensure_chat_base_model  # noqa: E402
from workers.lm.evaluate import evaluate_lm_checkpoints  # noqa: E402
from workers.lm.plans import plan_request, reading_recipe, recipe_request  # noqa: E402
from workers.lm.snapshot_data import preference_row, write_jsonl, write_snapshot_datasets  # noqa: E402
from workers.lm.text_conditions import text_condition_report  # noqa: E402
from workers.lm.training.checkpoint import PREFIX  # noqa: E402
from workers.lm.training.run import run_lm_training  # noqa: E402

GENERATORS = {"judge85": 0.85, "noise": 0.5}
N_PROXY, N_GOLD = 300, 300


def _store(work: Path, expert: Sequence[PairwiseText], proxy: Sequence[PairwiseText]) -> tuple[str, str]:
    url = f"sqlite:///{work}/store.db"
    with Session(make_engine(url)) as session:
        upsert_events(session, [ExpertLabel(event_id=f"e{i:05d}", annotator_id=f"a{i % 3}", item=p)
                                for i, p in enumerate(expert)])
        upsert_events(session, [ProxyPreference(event_id=f"p{i:05d}", proxy_name="judge", item=p)
                                for i, p in enumerate(proxy)])
        snapshot = freeze_snapshot(session).snapshot_id
        session.commit()
    return url, snapshot


def _checkpoints(paths: Sequence[str]) -> list[CheckpointRef]:
    return [CheckpointRef(step=int(Path(p).name.removeprefix(PREFIX)), path=p) for p in paths]


def _gate(evaluation: Any, rules: GateRules) -> tuple[bool, int | None, str]:
    """(released, the step it picks, its last reason), as the flow's gate task decides."""
    decision = decide_language_model(evaluation.evaluations, evaluation.baseline_accuracy, rules,
                                      evaluation.base_topk_mass)
    blocked = decision.decision == "block" or too_little_heldout(evaluation, rules) is not None
    return not blocked, decision.checkpoint.step if decision.checkpoint else None, decision.reasons[-1]


def one_run(generator: str, seed: int, n_expert: int, base: str, home: Path) -> dict[str, Any]:
    """The chat retrain path on one snapshot; the gold accuracy each gate serves."""
    task = chat_preferences(n_proxy=N_PROXY, n_expert=n_expert, proxy_accuracy=GENERATORS[generator], n_heldout=0,
                            seed=seed)
    gold = chat_preferences(n_proxy=0, n_expert=0, n_heldout=N_GOLD, seed=seed + 10_000).expert_heldout
    work = home / f"{generator}-{seed}-{n_expert}"
    work.mkdir(parents=True)
    url, snapshot = _store(work, task.expert, task.proxy)
    data = write_snapshot_datasets(url, snapshot, work / "data")
    recipe = reading_recipe("mixture", {"seed": 0})
    stage1_request = recipe_request("stage1", recipe, run_id="stage1", base_model=base, dataset=data.proxy,
                                    output_dir=work / "stage1")
    stage1 = run_lm_training(stage1_request, progress=lambda _: None)
    report = text_condition_report(TextConditionRequest(
        snapshot_id=snapshot, base_model=base, stage1_checkpoint=stage1["checkpoints"][-1], expert_pairs=data.expert,
        proxy_pairs=data.proxy, n_expert=data.n_expert_train + data.n_heldout, n_proxy=data.n_proxy,
        beta=float(stage1_request.config["beta"]), seed=0))
    record: dict[str, Any] = {"generator": generator, "seed": seed, "n_expert": n_expert, "plan": report.plan}
    if report.plan == "refuse":
        return record | {"baseline": 0.5, "tested": 0.5, "released": {"baseline": False, "tested": False}}
    request = plan_request(report.plan, recipe, run_id="plan", base_model=base,
                           stage1_checkpoint=stage1["checkpoints"][-1], expert_pairs=data.expert,
                           output_dir=work / "plan")
    trained = stage1 if request is None else run_lm_training(request, progress=lambda _: None)
    evaluated_on = stage1_request.base_model if request is None else request.base_model
    checkpoints = _checkpoints(trained["checkpoints"])
    evaluation = evaluate_lm_checkpoints(evaluated_on, data.heldout, checkpoints)
    gold_path = write_jsonl([preference_row(p, "expert") for p in gold], work / "gold.jsonl")
    gold_by_step = {e.step: e.heldout_accuracy
                    for e in evaluate_lm_checkpoints(evaluated_on, str(gold_path), checkpoints).evaluations}
    released: dict[str, bool] = {}
    for arm, rules in (("baseline", BASELINE_RULES), ("tested", TESTED_RULES)):
        released[arm], step, record[f"{arm}_reason"] = _gate(evaluation, rules)
        record[arm] = gold_by_step[step] if released[arm] and step is not None else 0.5
    return record | {"released": released, "n_heldout": evaluation.n_heldout}


def main(argv: Sequence[str] | None = None) -> None:
    per_budget, seed_start = per_budget_seeds(argv, __doc__ or "")
    torch.set_num_threads(1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gate-chance-chat-") as tmp:
        home = Path(tmp)
        base = str(ensure_chat_base_model("tiny", home / "models", seed=0))
        runs = run_grid(lambda generator, seed, n: one_run(generator, seed, n, base, home), list(GENERATORS),
                        per_budget, seed_start)
    print(json.dumps(report(runs, list(GENERATORS), started, quick=per_budget == QUICK_SEEDS, model="tiny")))


if __name__ == "__main__":
    main()
