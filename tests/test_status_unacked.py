"""`proxyloop status` shows a task whose worker was SIGKILLed mid-training: its delivery, taken and never
acknowledged, waits in Redis's `unacked` hash for the visibility timeout (hours by default), in no queue and
on no worker; status counts it beside the queue lengths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis as redislib
from celery import Celery

from proxyloop import testing
from tests.conftest import run_cli, stack_env, wait_until
from tests.faults.harness import running_stack, sigkill, start
from tests.flows.test_lost_tasks import snapshot, training
from workers.app import TRAIN_TASK

pytestmark = pytest.mark.integration


def test_status_counts_the_unacknowledged_delivery_of_a_sigkilled_worker(tmp_path):
    settings = testing.isolated_settings(tmp_path / "home", worker_torch_threads=1)
    with stack_env(), running_stack(settings):
        start(settings, "redis", "worker")
        request = training(settings, snapshot(settings), "run-killed", 20_000)
        client = Celery("status-test", broker=settings.celery_broker, backend=settings.celery_backend)
        try:
            client.send_task(TRAIN_TASK, args=[request.model_dump(mode="json")], queue="gpu", task_id=request.run_id)
        finally:
            client.close()
        out = Path(request.output_dir)
        wait_until(lambda: (out / "started.json").exists(), 60, "the worker to start training")
        sigkill(settings, "worker")
        assert redislib.Redis.from_url(settings.celery_broker).hlen("unacked") == 1

        shown = run_cli(settings, "status", "--json", timeout=120)
        view = json.loads(shown.stdout)
        assert view["queues"]["depths"] == {"gpu": 0, "cpu": 0, "unacked": 1}, shown.stdout[-3000:]
        assert view["queues"]["active_tasks"] in ([], None)  # no worker left to run it
        text = run_cli(settings, "status", timeout=120)
        assert "gpu 0, cpu 0, unacked 1" in text.stdout, text.stdout[-3000:] + text.stderr[-3000:]
