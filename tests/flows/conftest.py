"""A temporary Prefect server for this package's tests (Prefect's own test harness), for flows run as Prefect runs
them. One server for the package, not one per module: each start costs 10-15 s on a small machine. Its state
outlives a module: a test must not read what another leaves (test_runner_ready needs no `retrain` deployment
before its own; no other module deploys one)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="package")
def prefect_server() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
