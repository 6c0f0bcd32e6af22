"""Shared fixtures: settings on free loopback ports and real services started per session."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from proxyloop import stack
from proxyloop.settings import Settings
from proxyloop.stack import isolated_settings


def export(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `get_settings()` in this process (and children) resolve these settings."""
    from proxyloop.settings import get_settings

    for key, value in stack.child_env(settings).items():
        if key.startswith(("PROXYLOOP_", "PREFECT_")):
            monkeypatch.setenv(key, value)
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def service_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return isolated_settings(tmp_path_factory.mktemp("proxyloop-home"))


@pytest.fixture(scope="session")
def kafka(service_settings: Settings) -> Iterator[str]:
    """A real Kafka-protocol broker (Tansu) with the platform's topics."""
    from ingest.bus import ensure_topics

    component = next(c for c in stack.COMPONENTS if c.name == "kafka")
    stack.start_component(service_settings, component, lambda _: None)
    ensure_topics(service_settings)
    yield service_settings.kafka_bootstrap
    stack.stop_component(service_settings, "kafka")


@pytest.fixture(scope="session")
def redis(service_settings: Settings) -> Iterator[str]:
    component = next(c for c in stack.COMPONENTS if c.name == "redis")
    stack.start_component(service_settings, component, lambda _: None)
    yield service_settings.celery_broker
    stack.stop_component(service_settings, "redis")


@pytest.fixture(autouse=True)
def _no_hub_downloads() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"


@contextmanager
def celery_worker(settings: Settings, queues: str, name: str, log_path: Path) -> Iterator[Any]:
    """A real Celery worker process on `queues`, answering pings before the body runs; a Celery app to send with."""
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", queues, "-c", "1", "-n", f"{name}@%h",
         "--loglevel", "INFO"], env=stack.child_env(settings), stdout=log, stderr=subprocess.STDOUT)
    from workers.app import make_app

    app = make_app()
    deadline = time.monotonic() + 90
    while not app.control.ping(timeout=1) and time.monotonic() < deadline:
        assert process.poll() is None, log_path.read_text()
    try:
        yield app
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
