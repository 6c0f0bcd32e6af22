"""The stack calls the flows runner up only once it has polled: before that it is still registering
deployments and their triggers, and a trigger firing then races those writes on Prefect's SQLite."""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.deployments.runner import RunnerDeployment
from tenacity import Retrying, retry_if_result, stop_after_delay, wait_fixed

from ground.settings import Settings
from proxyloop.components import component

pytestmark = pytest.mark.integration


@flow(name="retrain")
def stand_in() -> None:
    """Named like the retrain flow: readiness looks the deployment up by that name."""


def test_the_flows_component_is_up_only_after_the_runners_first_poll(prefect_server: None, tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL

    settings = Settings(home=tmp_path, prefect_api_url=PREFECT_API_URL.value())
    ready = component("flows").healthy
    assert not ready(settings)  # no deployment yet

    deployment = stand_in.to_deployment(name="retrain")
    assert isinstance(deployment, RunnerDeployment)  # to_deployment is sync outside an event loop
    deployment_id = deployment.apply()
    assert isinstance(deployment_id, UUID)
    assert not ready(settings)  # registered, but no runner has asked for its runs

    with get_client(sync_client=True) as client:  # what a runner's poll calls
        client.get_scheduled_flow_runs_for_deployments(deployment_ids=[deployment_id])
    # The server marks a polled deployment READY in a background task, so the stack waits for it, as here.
    wait = Retrying(retry=retry_if_result(lambda up: not up), wait=wait_fixed(0.2), stop=stop_after_delay(60),
                    retry_error_callback=lambda state: False)
    assert wait(ready, settings)
