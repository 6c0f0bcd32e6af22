"""Shared fixtures: settings on free loopback ports and real services started per session."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from ground.settings import Settings
from proxyloop import stack
from proxyloop.testing import LabelStudioServer, free_port, isolated_settings, labelstudio_server


def export(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `get_settings()` in this process (and children) resolve these settings."""
    from ground.settings import get_settings

    for key, value in stack.child_env(settings).items():
        if key.startswith(("PROXYLOOP_", "PREFECT_")):
            monkeypatch.setenv(key, value)
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def service_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    # The session's shared broker holds throwaway topics: memory storage, no object store to start.
    # The durable default (Tansu on SeaweedFS) runs in test_durable_broker.py and the end-to-end tests.
    return isolated_settings(tmp_path_factory.mktemp("proxyloop-home"), broker_storage="memory")


@pytest.fixture(scope="session")
def kafka(service_settings: Settings) -> Iterator[str]:
    """A real Kafka-protocol broker (Tansu) with the platform's topics."""
    from ingest.bus import ensure_topics

    stack.start_component(service_settings, stack.component("kafka"), lambda _: None)
    ensure_topics(service_settings)
    yield service_settings.kafka_bootstrap
    stack.stop_component(service_settings, "kafka")


@pytest.fixture(scope="session")
def redis(service_settings: Settings) -> Iterator[str]:
    stack.start_component(service_settings, stack.component("redis"), lambda _: None)
    yield service_settings.celery_broker
    stack.stop_component(service_settings, "redis")


@pytest.fixture(scope="session")
def labelstudio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    """Label Studio from its own cached venv, headless on a free loopback port, admin + token preset (~35 s cold)."""
    with labelstudio_server(tmp_path_factory.mktemp("labelstudio"), free_port(), deadline_s=240) as server:
        yield server


@contextmanager
def stack_env(**variables: str) -> Iterator[None]:
    """Environment for the processes of a stack started in the body (children copy it): one intra-op thread for
    every torch in it (the worker's fits, the flows runner's condition tests, acquisition refreshes and chat base
    model), plus `variables`. With torch's default, one thread per core, those processes contend with the rest of
    the stack on a small machine: on a loaded 2-core one the demo's retrain ran past its 300 s deadline, with one
    thread it took 20-30 s (as test_demo_labelstudio.py found for its worker)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("OMP_NUM_THREADS", "1")
    for name, value in variables.items():
        patch.setenv(name, value)
    try:
        yield
    finally:
        patch.undo()


@pytest.fixture(autouse=True)
def _no_hub_downloads() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(autouse=True)
def _own_reference_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own DPO reference cache: none fills ./.proxyloop, none reads another's entries."""
    monkeypatch.setenv("PROXYLOOP_REFERENCE_CACHE_DIR", str(tmp_path / "reference-cache"))


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


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Tiny fits in this process: extra intra-op threads only contend with other processes on a shared machine
    (on a loaded 2-core one, the browser queue's world took 132 s to build with two threads, 1.4 s with one)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """`one_torch_thread` for a test's body."""
    with one_torch_thread():
        yield


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def run_cli(settings: Settings, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`proxyloop ARGS` as a user runs it, resolving these settings."""
    return subprocess.run([sys.executable, "-m", "proxyloop.cli", *args], env=stack.child_env(settings),
                          capture_output=True, text=True, timeout=timeout)


def run_demo(settings: Settings, report_path: Path, *args: str) -> None:
    """`proxyloop demo ARGS` to a report, leaving the stack up for the test to inspect (and stop)."""
    demo = run_cli(settings, "demo", *args, "--report", str(report_path), "--keep-up")
    assert demo.returncode == 0, demo.stdout[-4000:] + demo.stderr[-4000:]


def launch_chromium(playwright: Any) -> Any:
    """Debian's headless Chromium, with nothing that reaches outside this machine."""
    return playwright.chromium.launch(executable_path="/usr/bin/chromium", args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"])


@contextmanager
def consumer_in_thread(settings: Settings) -> Iterator[Any]:
    """The ingest consumer loop running in a thread for the body; stopped and joined afterwards."""
    import threading

    from ingest import consumer as ingest_consumer

    stop = threading.Event()
    thread = threading.Thread(target=ingest_consumer.run, args=(settings, stop), daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join(timeout=30)


def stored_snapshot(settings: Settings, task: Any) -> str:
    """Store a synthetic task's proxy and expert triples as events and freeze a snapshot of them."""
    from sqlalchemy.orm import Session

    from ground.schemas import ExpertLabel, ProxyPreference
    from ingest.store import freeze_snapshot, make_engine
    from ingest.upsert import upsert_events

    with Session(make_engine(settings.resolved_store_url)) as session:
        upsert_events(session, [ProxyPreference(event_id=f"p{i}", proxy_name="j", item=t)
                                for i, t in enumerate(task.proxy)])
        upsert_events(session, [ExpertLabel(event_id=f"e{i}", annotator_id="a", item=t)
                                for i, t in enumerate(task.expert)])
        snapshot_id = freeze_snapshot(session).snapshot_id
        session.commit()
    return snapshot_id


def own_topics(service_settings: Settings, tmp_path: Path, **overrides: object) -> Settings:
    """The session's broker, with this test's own home, SQLite store, consumer group and topics (created),
    and the retrain thresholds out of reach."""
    from ingest.bus import ensure_topics

    name = tmp_path.name
    settings = service_settings.model_copy(update={
        "home": tmp_path, "store_url": f"sqlite:///{tmp_path}/store.db", "consumer_group": f"g-{name}",
        "topic_proxy": f"proxy-{name}", "topic_expert": f"expert-{name}", "topic_dead_letter": f"dead-{name}",
        "retrain_min_expert": 10**6, "retrain_min_proxy": 10**6, **overrides})
    ensure_topics(settings)
    return settings
