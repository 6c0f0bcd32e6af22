"""Faults in every service, mid-stream: nothing acknowledged is lost, nothing is stored, trained or
released twice, and every run ends in a visible state. The long cases are in `bench/faults.py`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import stack_env
from tests.faults import harness, ingest_cases, run_cases
from tests.faults.pg import PostgresServer, create_database, postgres_server

pytestmark = [pytest.mark.faults, pytest.mark.integration]


@pytest.fixture
def pg() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this test's own: the test stops and starts it."""
    with postgres_server() as server:
        yield server


def test_http_app_sigkilled_during_a_webhook_burst_stores_every_answered_label_once(tmp_path: Path) -> None:
    figures = ingest_cases.http_killed_during_burst(harness.case_settings(tmp_path), webhooks=150, kill_after=50)
    assert figures.acknowledged == 150  # every webhook is answered 200 in the end (the client retries)
    assert (figures.lost, figures.duplicated, figures.stored) == (0, 0, 150)
    assert figures.detail["failed_attempts"] >= 1  # the kill did break requests in flight


def test_postgresql_stopped_for_seconds_while_events_flow_loses_nothing(tmp_path: Path, pg: PostgresServer) -> None:
    settings = harness.case_settings(tmp_path, store_url=create_database(pg.url, "faults"))
    figures = ingest_cases.store_stopped(settings, pg, outage_s=5)
    assert figures.detail["consumer_survived"] is True
    assert figures.acknowledged >= 60
    assert (figures.lost, figures.duplicated, figures.stored) == (0, 0, figures.acknowledged)


def test_redis_down_at_training_dispatch_the_run_completes_once(tmp_path: Path) -> None:
    with stack_env():  # torch on one thread in the stack's processes: they share a small machine (see stack_env)
        figures = run_cases.redis_stopped(harness.case_settings(tmp_path), during="dispatch")
    assert figures.detail["status"] == "released" and figures.detail["prefect_state"] == "COMPLETED"
    assert figures.detail["dispatch_attempts"] >= 2  # the first one met Redis down
    assert (figures.detail["trained"], figures.detail["released"]) == (1, 1)
    assert (figures.lost, figures.duplicated) == (0, 0)
