"""The Celery app: queues `gpu` (training) and `cpu` (evaluation), late acks, prefetch 1.

Run a worker: `celery -A workers.app worker -Q gpu,cpu -c 1` (started by `proxyloop up`; at
scale, GPU hosts run `-Q gpu` against the broker in `PROXYLOOP_CELERY_BROKER`).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from celery.signals import worker_process_init
from kombu import Queue

from ground.settings import get_settings

TRAIN_TASK = "proxyloop.train"
EVALUATE_TASK = "proxyloop.evaluate"
PING_TASK = "proxyloop.ping"
GPU_QUEUE = "gpu"
CPU_QUEUE = "cpu"


def make_app() -> Celery:
    settings = get_settings()
    celery = Celery("proxyloop", broker=settings.celery_broker, backend=settings.celery_backend)
    celery.conf.update(
        task_queues=[Queue(GPU_QUEUE), Queue(CPU_QUEUE)],
        task_routes={
            TRAIN_TASK: {"queue": GPU_QUEUE},
            EVALUATE_TASK: {"queue": CPU_QUEUE},
            PING_TASK: {"queue": GPU_QUEUE},
            "proxyloop.train_lm": {"queue": GPU_QUEUE},
        },
        # Training must survive a dying worker: ack after the task, one task in hand at a time.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_extended=True,
        broker_connection_retry_on_startup=True,
        # A result the backend could not take (Redis restarting) is retried, backing off to 10 s apart,
        # for about 5 minutes, rather than failing a finished training run. Flows read states with this off
        # (flows.celery_tasks.result_app): an outage must raise there, for the wait to see it.
        result_backend_always_retry=True,
        result_backend_max_retries=40,
        result_backend_max_sleep_between_retries_ms=10_000,
        # Redis redelivers a dead worker's unacked task after the visibility timeout (see Settings).
        broker_transport_options={"visibility_timeout": settings.celery_visibility_timeout_s,
                                  "unacked_restore_interval": settings.celery_unacked_restore_interval_s,
                                  "unacked_restore_throttle": 1},
        imports=("workers.features.tasks", "workers.lm.tasks"),  # loaded by the worker; senders use task names only
    )
    return celery


app = make_app()


@worker_process_init.connect
def limit_torch_threads(**_: Any) -> None:
    """Each worker process (prefork: where the tasks run) sets torch's CPU threads once, before any task;
    `PROXYLOOP_WORKER_TORCH_THREADS` = 0 leaves torch's default. torch is imported only when a limit is set."""
    threads = get_settings().worker_torch_threads
    if threads:
        import torch

        torch.set_num_threads(threads)


def report_progress(task: Task, meta: dict[str, Any]) -> None:
    """Progress to the result backend, best-effort: the backend being away (Redis restarting) must not
    end a training run that is otherwise fine. The flow keeps polling through such an outage."""
    try:
        task.update_state(state="PROGRESS", meta=meta)
    except Exception as exc:  # noqa: BLE001 - any backend's connection error; progress is informational
        logging.getLogger("proxyloop.workers").warning("progress not reported (%s); training goes on", exc)
