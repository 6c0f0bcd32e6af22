"""Celery tasks as a flow sees them: send one to its queue, wait for its result, send it again if the
broker lost it or its worker died, and tell a worker's failure (final) from a broker or backend hiccup
(worth a retry)."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

from celery import Celery
from celery.result import AsyncResult
from kombu.exceptions import OperationalError as KombuOperationalError
from prefect import get_run_logger
from prefect.exceptions import MissingContextError
from pydantic import BaseModel
from redis import Redis
from redis.exceptions import RedisError

from ground.schemas import LMTrainingRequest, TrainingRequest, TrainingResult
from workers.app import GPU_QUEUE, make_app
from workers.app import app as celery_app

TASK_TIMEOUT_S = 1800  # a task whose state and progress stay unchanged this long fails the wait
RETRY_DELAYS_S: list[float] = [2, 10, 30]  # a Prefect task's retry delays for transient failures


class TrainingFailed(RuntimeError):
    """A Celery task failed on its worker; retrying the flow step would repeat the failure."""


RetryCondition = Callable[[Any, Any, Any], bool]


def retry_unless(*permanent: type[BaseException]) -> RetryCondition:
    """A Prefect task's `retry_condition_fn` that retries anything but `permanent` failures: those a second try
    would meet again (a failure on the worker; a snapshot with too few tasks, which will not change)."""
    def condition(task: Any, task_run: Any, state: Any) -> bool:
        try:
            state.result()
        except permanent:
            return False
        except Exception:  # noqa: BLE001 - anything else may be a hiccup worth a retry
            return True
        return True

    return condition


transient = retry_unless(TrainingFailed)  # retry anything but a failure on the worker


# Errors of the Celery result backend or broker being away (the embedded Redis restarting, say).
BACKEND_ERRORS = (OSError, KombuOperationalError, RedisError)
LOST_AFTER_S = 30.0  # PENDING this long: look for the task's message (lost with the broker?)
ORPHAN_AFTER_S = 120.0  # STARTED or PROGRESS unchanged this long: look for a worker running it (did it die?)
LOOK_EVERY_S = 5.0  # between looks; a task is sent again only when two looks in a row find it nowhere
INSPECT_TIMEOUT_S = 3.0  # how long live workers get to say what they hold
# kombu's Redis transport: a message taken by a worker and not acknowledged is a field of this hash, keyed by its
# delivery tag (and scored by time in the index), until acknowledged or, after the visibility timeout, requeued.
UNACKED_KEY, UNACKED_INDEX_KEY = "unacked", "unacked_index"
PRIORITY_SEP, PRIORITY_STEPS = "\x06\x16", (3, 6, 9)  # its lists of a queue's messages sent with a priority


def _logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The flow run's logger; a plain one when called outside a run (a script, a bench)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("proxyloop.flows")


@cache
def result_app() -> Celery:
    """The app a flow reads task states with: workers.app's, but with the result backend unreachable a read raises
    one of BACKEND_ERRORS instead of retrying inside Celery for minutes, so that the wait sees the outage and
    logs it. Workers keep retrying the results they store (workers.app)."""
    poller = make_app()
    poller.conf.result_backend_always_retry = False
    return poller


@dataclass(frozen=True)
class BrokerView:
    """Where a Redis broker holds a task's message."""

    queued: bool  # waiting in a queue
    taken: list[bytes | str]  # delivery tags in the `unacked` hash: taken by a worker and not acknowledged


def _message_id(payload: object) -> object:
    return payload.get("headers", {}).get("id") if isinstance(payload, dict) else None


def _names(task_id: str, raw: bytes | str, unacked: bool = False) -> bool:
    """Whether a stored message (an `unacked` entry: [message, exchange, routing key]) is the task's."""
    if task_id not in (raw.decode(errors="replace") if isinstance(raw, bytes) else raw):
        return False
    try:
        payload = json.loads(raw)
        return _message_id(payload[0] if unacked else payload) == task_id
    except (ValueError, LookupError):
        return True  # not kombu's format: the id is in it, so it may be the task's


def redis_broker() -> Redis | None:
    url = str(celery_app.conf.broker_url or "")
    return Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5) if url.startswith("redis") else None


def broker_view(task_id: str) -> BrokerView | None:
    """The task's message in a Redis broker; None when the broker is not Redis or did not answer."""
    client = redis_broker()
    if client is None:
        return None
    queues = [queue.name for queue in celery_app.conf.task_queues]
    keys = queues + [f"{queue}{PRIORITY_SEP}{step}" for queue in queues for step in PRIORITY_STEPS]
    try:
        queued = any(_names(task_id, raw) for key in keys for raw in client.lrange(key, 0, -1))
        taken = [tag for tag, raw in client.hgetall(UNACKED_KEY).items() if _names(task_id, raw, unacked=True)]
    except BACKEND_ERRORS:
        return None
    finally:
        client.close()
    return BrokerView(queued, taken)


def forget_deliveries(tags: list[bytes | str]) -> None:
    """Drop dead workers' deliveries from `unacked`, so that they are not redelivered after the visibility timeout."""
    client = redis_broker()
    if client is not None and tags:
        try:
            pipe = client.pipeline()
            pipe.hdel(UNACKED_KEY, *tags)
            pipe.zrem(UNACKED_INDEX_KEY, *tags)
            pipe.execute()
        except BACKEND_ERRORS:
            pass  # left for the visibility timeout: its redelivery finds the run finished or resumes it
        finally:
            client.close()


def held_by(task_id: str) -> list[str] | None:
    """The live workers holding the task (running or reserved); None when the broker did not carry the question or
    no worker answered it: then a resend would only take a live worker's delivery from it, or go to no one."""
    try:
        replies = celery_app.control.inspect(timeout=INSPECT_TIMEOUT_S).query_task(task_id)
    except Exception:  # noqa: BLE001 - any broker error: cannot tell
        return None
    if not replies:  # no worker answered (none up, or all too busy to): silence says nothing about the task
        return None
    return [worker for worker, tasks in replies.items() if task_id in (tasks or {})]


class _Watch:
    """One task's state as polled, with what it takes to tell it lost or orphaned."""

    def __init__(self, task_id: str, resend: Callable[[], object] | None) -> None:
        self.task_id, self.resend, self.log = task_id, resend, _logger()
        self.result = AsyncResult(task_id, app=result_app())
        self.outage_since: float | None = None
        self.last: tuple[str, object] | None = None
        self.changed = self.looked = time.monotonic()  # the state or progress last changed (or a look); the broker
        self.progressed = self.changed  # the state or progress last changed: what the wait's timeout counts from
        self.nowhere = False  # the last look found the task in no queue and on no live worker

    def poll(self) -> str:
        try:
            current = self.result.state
            info = self.result.info if current in ("STARTED", "PROGRESS") else None
        except BACKEND_ERRORS as exc:
            if self.outage_since is None:
                self.log.warning("task %s: the result backend is unreachable (%s); waiting for it", self.task_id, exc)
                self.outage_since = time.monotonic()
            return "UNREACHABLE"
        if self.outage_since is not None:
            self.log.info("task %s: the result backend is back after %.0f s; the task is %s", self.task_id,
                          time.monotonic() - self.outage_since, current)
            self.outage_since = None
        if current in ("FAILURE", "REVOKED"):
            raise TrainingFailed(f"task {self.task_id} {current.lower()} on the worker: {self.result.result!r}\n"
                                 f"{self.result.traceback}")
        if (current, info) != self.last:
            if current == "PROGRESS":
                self.log.info("task %s: %s", self.task_id, info)
            self.last, self.changed, self.nowhere = (current, info), time.monotonic(), False
            self.progressed = self.changed
        elif self._stale(current):
            self._look(current)
        return current

    def _stale(self, current: str) -> bool:
        idle = time.monotonic() - self.changed
        due = time.monotonic() - self.looked >= LOOK_EVERY_S
        return due and (current == "PENDING" and idle > LOST_AFTER_S or
                        current in ("STARTED", "PROGRESS") and idle > ORPHAN_AFTER_S)

    def _look(self, current: str) -> None:
        """Send the task again when two looks in a row find its message in no queue and no live worker holding it:
        PENDING, it was lost with the broker (the embedded Redis keeps nothing across a restart); STARTED or in
        PROGRESS, its worker died (its delivery waits out the visibility timeout in `unacked`)."""
        self.looked = time.monotonic()
        view = broker_view(self.task_id)
        holders = None if view is None or view.queued else held_by(self.task_id)
        if view is None or view.queued or holders is None or holders:
            self.nowhere = False
            return
        if not self.nowhere:
            self.nowhere = True  # once more before believing it: a worker may have just taken it
            return
        what = "lost with the broker" if current == "PENDING" else "orphaned: no live worker runs it"
        idle = time.monotonic() - self.changed
        if self.resend is None:
            self.log.warning("task %s: %s %.0f s, and not queued nor held by any live worker, so %s; it cannot be "
                             "sent again from here", self.task_id, current, idle, what)
            self.changed, self.nowhere = time.monotonic(), False
            return
        self.log.warning("task %s: %s %.0f s, and not queued nor held by any live worker, so %s; sending it again",
                         self.task_id, current, idle, what)
        forget_deliveries(view.taken)
        self.resend()
        self.changed, self.nowhere = time.monotonic(), False


def wait_for_task(task_id: str, resend: Callable[[], object] | None = None,
                  timeout_s: float = TASK_TIMEOUT_S) -> dict[str, Any]:
    """Poll a Celery task, logging its progress; a failed task raises with the worker's error.

    A result-backend outage is waited out (the worker keeps training, see workers.app.report_progress). A task
    that stays PENDING (LOST_AFTER_S), or STARTED or PROGRESS without change (ORPHAN_AFTER_S), and that a Redis
    broker holds in no queue and no live worker holds, is sent again with `resend`: its message was lost with the
    broker, or its worker died. The task must be idempotent by its id: a training task's id is the run id, and a
    worker returns a finished run's stored result or resumes from its checkpoint; an evaluation only reads.

    `timeout_s` counts from the last change of state or progress, not from the start: a long training that reports
    progress is waited for however long it takes; one with no worker to take it, a worker silent for that long, or a
    task resent again and again without progress (its workers keep dying) fails the wait.
    """
    watch = _Watch(task_id, resend)
    while watch.poll() != "SUCCESS":
        if time.monotonic() - watch.progressed > timeout_s:
            raise TrainingFailed(f"task {task_id}: {watch.last[0] if watch.last else 'PENDING'} with no progress "
                                 f"for {timeout_s:.0f} s")
        time.sleep(0.5)
    value: dict[str, Any] = watch.result.get(timeout=10)
    return value


def run_on_queue(task_name: str, request: BaseModel, queue: str, task_id: str | None = None) -> dict[str, Any]:
    """Send a task with a request and wait for its result, sending it again (same id) if it was lost: for tasks
    safe to run twice (idempotent by `task_id`, or reading only)."""
    task_id = task_id or str(uuid.uuid4())

    def send() -> object:
        return celery_app.send_task(task_name, args=[request.model_dump(mode="json")], queue=queue, task_id=task_id)

    send()
    return wait_for_task(task_id, resend=send)


def train_on_gpu_queue(task_name: str, request: TrainingRequest | LMTrainingRequest, what: str) -> TrainingResult:
    """Send a training task and wait for its `TrainingResult`. The task id is the run id: a retried
    dispatch finds the same task, and the worker's result is idempotent."""
    def send() -> object:
        return celery_app.send_task(task_name, args=[request.model_dump(mode="json")], queue=GPU_QUEUE,
                                    task_id=request.run_id)

    send()
    _logger().info("run %s: %s sent to queue %s", request.run_id, what, GPU_QUEUE)
    return TrainingResult.model_validate(wait_for_task(request.run_id, resend=send))
