"""Celery tasks of language-model policies: `proxyloop.train_lm` (DPO/IPO/hinge or SFT, or a stage of the mode
mixture with config `reading="mixture"` (`mixture_run.py`), queue `gpu`),
`proxyloop.evaluate_lm` (held-out pairwise accuracy and indicators per checkpoint, queue `cpu`) and
`proxyloop.text_conditions` (paper 1's condition tests on a stage-1 model, queue `gpu`: it runs the models).

Send: `app.send_task("proxyloop.train_lm", args=[LMTrainingRequest(...).model_dump()], task_id=run_id)`; it
returns a `TrainingResult` (the run's full record is its `result.json`).
`train_lm` is idempotent by run id: a finished run returns its stored result; a redelivered one (its worker
died; acks_late + Redis visibility timeout) resumes from the newest checkpoint. Progress goes to
the result backend as state PROGRESS (step, loss, tokens/s) and to the worker log.
On a worker that owns several devices (`PROXYLOOP_GPUS_PER_WORKER`) the task stays one unit of work: it
starts torchrun over them (`training/distributed.py`), relays rank 0's progress and returns rank 0's result.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from celery import Task

from ground.schemas import CheckpointRef, EvaluationRequest, LMTrainingRequest, TextConditionRequest, TrainingResult
from ground.settings import get_settings
from workers.app import app, report_progress
from workers.device import select_device
from workers.lm.evaluate import evaluate_lm_checkpoints
from workers.lm.text_conditions import text_condition_report
from workers.lm.training.checkpoint import PREFIX, latest_checkpoint, run_dir_lock
from workers.lm.training.distributed import world_size
from workers.lm.training.run import run_lm_training

TRAIN_LM_TASK = "proxyloop.train_lm"
EVALUATE_LM_TASK = "proxyloop.evaluate_lm"
TEXT_CONDITIONS_TASK = "proxyloop.text_conditions"
log = logging.getLogger("proxyloop.workers.lm")


@app.task(name=TRAIN_LM_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def train_lm(self: Task, request: dict[str, Any]) -> dict[str, Any]:
    """The run's `TrainingResult`, as JSON."""
    req = LMTrainingRequest.model_validate(request)
    resume = latest_checkpoint(Path(req.output_dir))
    attempt = f"resuming from {resume.name}" if resume else "starting"
    settings = get_settings()
    device = select_device(req.config.get("device") or None)
    ranks = world_size(device.type, settings.gpus_per_worker, settings.cpu_ranks_per_worker)
    log.info("run %s: %s %s on %d %s rank(s), base %s, data %s", req.run_id, attempt, req.method, ranks,
             device.type, req.base_model, req.dataset)

    def progress(meta: dict[str, Any]) -> None:
        report_progress(self, {"run_id": req.run_id, **meta})
        log.info("run %s: step %s/%s loss %.5f %.0f tokens/s", req.run_id, meta["step"], meta["of"],
                 meta["loss"], meta["tokens_per_s"])

    with run_dir_lock(Path(req.output_dir)):  # a second delivery waits, then returns this one's result
        result = run_lm_training(req, progress, worker=self.request.hostname or "", ranks=ranks)
    log.info("run %s: done, final loss %.5f", req.run_id, result["final_loss"])
    return TrainingResult(
        run_id=req.run_id, device=result["device"], worker=result["worker"], final_loss=result["final_loss"],
        seconds=result["seconds"],
        checkpoints=[CheckpointRef(step=int(Path(c).name.removeprefix(PREFIX)), path=c) for c in result["checkpoints"]],
    ).model_dump(mode="json")


@app.task(name=EVALUATE_LM_TASK, bind=True, acks_late=True)
def evaluate_lm(self: Task, request: dict[str, Any]) -> dict[str, Any]:
    """Send: `app.send_task("proxyloop.evaluate_lm", args=[EvaluationRequest(base_model=..., heldout_path=...,
    checkpoints=[...]).model_dump()], queue="cpu")`; returns an `Evaluation`. Reads only files: safe to redeliver.
    """
    req = EvaluationRequest.model_validate(request)
    if req.base_model is None or req.heldout_path is None:
        raise ValueError("a language-model evaluation needs base_model and heldout_path")
    result = evaluate_lm_checkpoints(req.base_model, req.heldout_path, req.checkpoints)
    log.info("%d checkpoints evaluated on %d held-out pairs; the base model's log-prob ranking gets %.3f",
             len(req.checkpoints), result.n_heldout, result.base_model_log_prob_accuracy)
    return result.model_dump(mode="json")


@app.task(name=TEXT_CONDITIONS_TASK, bind=True, acks_late=True)
def text_conditions(self: Task, request: dict[str, Any]) -> dict[str, Any]:
    """Send: `app.send_task("proxyloop.text_conditions", args=[TextConditionRequest(...).model_dump()], queue="gpu")`;
    returns the `ConditionReport` of paper 1's tests on the stage-1 model. Reads only files: safe to redeliver."""
    report = text_condition_report(TextConditionRequest.model_validate(request))
    log.info("snapshot %s: plan %s (%s)", report.snapshot_id, report.plan, "; ".join(report.reasons))
    return report.model_dump(mode="json")
