"""Thin Celery tasks: arguments are ids and paths; data is re-fetched from the store inside.

Idempotent by run id (a finished run returns its stored result), which makes `acks_late`
redelivery safe.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from celery import Task
from sqlalchemy.orm import Session

from ground.schemas import Evaluation, EvaluationRequest, FeatureTriple, TrainingRequest
from ingest.store import LabelKind, load_snapshot_triples, make_engine, split_expert
from workers.app import EVALUATE_TASK, PING_TASK, TRAIN_TASK, app, report_progress
from workers.device import select_device
from workers.features.evaluate import evaluate_checkpoint, expert_only_baseline
from workers.features.training import n_outputs_of, train_feature_policy

log = logging.getLogger("proxyloop.workers")


def _snapshot(store_url: str, snapshot_id: str) -> dict[LabelKind, list[FeatureTriple]]:
    with Session(make_engine(store_url)) as session:
        return load_snapshot_triples(session, snapshot_id)


@app.task(name=TRAIN_TASK, bind=True, acks_late=True)
def train(self: Task, request: dict[str, Any]) -> dict[str, Any]:
    req = TrainingRequest.model_validate(request)
    result_path = Path(req.output_dir) / "result.json"
    if result_path.exists():
        log.info("run %s already finished; returning its result", req.run_id)
        return dict(json.loads(result_path.read_text()))
    # When the worker picked the run up: operators and bench/trigger_latency.py read it.
    Path(req.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(req.output_dir) / "started.json").write_text(json.dumps({"started_at": time.time(),
                                                                    "worker": self.request.hostname}))
    triples = _snapshot(req.store_url, req.snapshot_id)
    expert_train, _ = split_expert(triples["expert"])
    device = select_device()
    log.info("run %s: plan %s on %s, %d proxy / %d expert triples", req.run_id, req.plan, device,
             len(triples["proxy"]), len(expert_train))

    def progress(meta: dict[str, object]) -> None:
        report_progress(self, {"run_id": req.run_id, "device": str(device), **meta})
        log.info("run %s: %s", req.run_id, meta)

    result = train_feature_policy(req, triples["proxy"], expert_train, device, self.request.hostname or "", progress)
    result_path.write_text(result.model_dump_json(indent=2))
    return result.model_dump(mode="json")


@app.task(name=PING_TASK)
def ping() -> str:
    """An empty task: a health probe for the queue path and the floor of task latency."""
    return "pong"


@app.task(name=EVALUATE_TASK, bind=True, acks_late=True)
def evaluate(self: Task, request: dict[str, Any]) -> dict[str, Any]:
    """An `EvaluationRequest` (store_url, snapshot_id, seed, checkpoints) → an `Evaluation`, as JSON."""
    req = EvaluationRequest.model_validate(request)
    if req.store_url is None or req.snapshot_id is None:
        raise ValueError("a feature-policy evaluation needs store_url and snapshot_id")
    triples = _snapshot(req.store_url, req.snapshot_id)
    expert_train, heldout = split_expert(triples["expert"])
    evaluations = [evaluate_checkpoint(ref, heldout) for ref in req.checkpoints]
    n_outputs = n_outputs_of([*triples["proxy"], *triples["expert"]])
    baseline = expert_only_baseline(expert_train, heldout, n_outputs, req.seed)
    log.info("snapshot %s: %d checkpoints evaluated, expert-only baseline %.3f", req.snapshot_id, len(evaluations),
             baseline)
    return Evaluation(evaluations=evaluations, baseline_accuracy=baseline, n_heldout=len(heldout),
                      language_model=False).model_dump(mode="json")
