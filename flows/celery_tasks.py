"""Celery tasks as a flow sees them: send one to its queue, wait for its result, send it again if the
broker lost it, and tell a worker's failure (final) from a broker or backend hiccup (worth a retry)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from celery.result import AsyncResult
from kombu.exceptions import OperationalError as KombuOperationalError
from prefect import get_run_logger
from redis.exceptions import RedisError
from tenacity import RetryCallState, Retrying, retry_if_result, stop_after_delay, wait_fixed

from ground.schemas import LMTrainingRequest, TrainingRequest, TrainingResult
from workers.app import GPU_QUEUE
from workers.app import app as celery_app

TASK_TIMEOUT_S = 1800
RETRY_DELAYS_S: list[float] = [2, 10, 30]  # a Prefect task's retry delays for transient failures


class TrainingFailed(RuntimeError):
    """A Celery task failed on its worker; retrying the flow step would repeat the failure."""


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """A Prefect task's `retry_condition_fn`: retry anything but a failure on the worker."""
    try:
        state.result()
    except TrainingFailed:
        return False
    except Exception:  # noqa: BLE001 - anything else may be a hiccup worth a retry
        return True
    return True


# Errors of the Celery result backend or broker being away (the embedded Redis restarting, say).
BACKEND_ERRORS = (OSError, KombuOperationalError, RedisError)
LOST_AFTER_S = 30.0  # PENDING this long after an outage, the task died with the broker: send it again


def wait_for_task(task_id: str, resend: Callable[[], object] | None = None,
                  timeout_s: float = TASK_TIMEOUT_S) -> dict[str, Any]:
    """Poll a Celery task, logging its progress; a failed task raises with the worker's error.

    A result-backend outage is waited out (the worker keeps training, see workers.app.report_progress).
    If afterwards the task stays PENDING for LOST_AFTER_S, its message was lost with the broker (the
    embedded Redis keeps nothing across a restart) and `resend` sends it again: the task id is the
    run id, and a worker returns a finished run's stored result or resumes from its checkpoint.
    """
    logger = get_run_logger()
    result = AsyncResult(task_id, app=celery_app)
    seen: list[object] = [None]
    outage: dict[str, float | None] = {"since": None, "back": None}

    def state() -> str:
        try:
            current = result.state
        except BACKEND_ERRORS as exc:
            if outage["since"] is None:
                logger.warning("task %s: the result backend is unreachable (%s); waiting for it", task_id, exc)
                outage["since"] = time.monotonic()
            return "UNREACHABLE"
        if outage["since"] is not None:
            logger.info("task %s: the result backend is back; the task is %s", task_id, current)
            outage["since"], outage["back"] = None, time.monotonic()
        if current in ("FAILURE", "REVOKED"):
            raise TrainingFailed(f"task {task_id} {current.lower()} on the worker: {result.result!r}\n"
                                 f"{result.traceback}")
        if current == "PROGRESS" and result.info != seen[-1]:
            seen.append(result.info)
            logger.info("task %s: %s", task_id, result.info)
        back = outage["back"]
        if current != "PENDING":
            outage["back"] = None
        elif back is not None and time.monotonic() - back > LOST_AFTER_S and resend is not None:
            logger.warning("task %s: still pending %.0f s after the outage, so lost with the broker; sending it "
                           "again", task_id, LOST_AFTER_S)
            resend()
            outage["back"] = None
        return current

    def timed_out(retry_state: RetryCallState) -> str:
        raise TrainingFailed(f"task {task_id} did not finish within {timeout_s:.0f} s")

    poll = Retrying(retry=retry_if_result(lambda current: current != "SUCCESS"), wait=wait_fixed(0.5),
                    stop=stop_after_delay(timeout_s), retry_error_callback=timed_out)
    poll(state)
    value: dict[str, Any] = result.get(timeout=10)
    return value


def train_on_gpu_queue(task_name: str, request: TrainingRequest | LMTrainingRequest, what: str) -> TrainingResult:
    """Send a training task and wait for its `TrainingResult`. The task id is the run id: a retried
    dispatch finds the same task, and the worker's result is idempotent."""
    def send() -> object:
        return celery_app.send_task(task_name, args=[request.model_dump(mode="json")], queue=GPU_QUEUE,
                                    task_id=request.run_id)

    send()
    get_run_logger().info("run %s: %s sent to queue %s", request.run_id, what, GPU_QUEUE)
    return TrainingResult.model_validate(wait_for_task(request.run_id, resend=send))
