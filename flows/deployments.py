"""Serve every stage as a deployment; `retrain` is started by the dataset threshold event.

Run: `python -m flows.deployments` (started by `proxyloop up`; needs PREFECT_API_URL). At scale, use
a Prefect work pool instead; the triggers and limits are the same. With `PROXYLOOP_FLOW_START=forkserver`
(the default) flows are added to the runner as flow objects (`Runner.add_flow`), so the runner starts
each run from the object it holds, forked from a process that imported the flow modules already
(`flows.warm_start`); with `spawn` they are added as deployments and each run is Prefect's own
`python -m prefect.engine`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from prefect import Flow
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentEventTrigger
from prefect.exceptions import TerminationSignal
from prefect.logging import get_logger
from prefect.runner import Runner

from flows.acquisition import acquisition_deployment_options, refresh_acquisition_flow
from flows.health import ingest_health_flow
from flows.probe import HEALTH_EVENT, health_flow
from flows.reconcile import reconcile_flow
from flows.retrain import check_conditions_flow, evaluate_and_gate_flow, release_flow, retrain
from flows.warm_start import use_forkserver
from ground.schemas import DATASET_UPDATED_EVENT
from ground.settings import Settings, get_settings

RETRAIN_DEPLOYMENT = "retrain/retrain"
__all__ = ["HEALTH_EVENT", "RETRAIN_DEPLOYMENT", "health_flow", "main", "retrain_trigger", "served_flows"]

ServedFlow = tuple[Flow[..., Any], dict[str, Any]]


def retrain_trigger() -> DeploymentEventTrigger:
    """Start `retrain` whenever the consumer reports a threshold crossing."""
    return DeploymentEventTrigger(
        expect={DATASET_UPDATED_EVENT},
        parameters={
            "expert_total": "{{ event.payload.expert_total }}",
            "proxy_total": "{{ event.payload.proxy_total }}",
        },
    )


def served_flows(settings: Settings) -> list[ServedFlow]:
    """Each flow the runner serves with its deployment options (`Runner.add_flow` keywords)."""
    return [
        # concurrency_limit=1: at most one retrain of the policy at a time; later triggers queue.
        (retrain, {"name": "retrain", "triggers": [retrain_trigger()], "concurrency_limit": 1}),
        (check_conditions_flow, {"name": "check-conditions"}),
        (evaluate_and_gate_flow, {"name": "evaluate-and-gate"}),
        (release_flow, {"name": "release"}),
        (health_flow, {"name": "health", "triggers": [DeploymentEventTrigger(expect={HEALTH_EVENT})]}),
        # Samples consumer lag and raises proxyloop.ingest.lag-growing / consumer-stalled.
        (ingest_health_flow, {"name": "ingest-health", "interval": settings.health_interval_s}),
        # Scheduled only where a Label Studio is configured (a token); runnable by hand everywhere.
        (reconcile_flow, {"name": "reconcile-labelstudio", "interval":
                          settings.labelstudio_reconcile_interval_s if settings.labelstudio_token else None}),
        (refresh_acquisition_flow, acquisition_deployment_options()),
    ]


def main() -> None:
    settings = get_settings()
    served = served_flows(settings)
    # query_seconds: how often the runner asks for the runs a trigger created (Prefect's default: 1 s).
    runner = Runner(name="proxyloop", query_seconds=settings.runner_poll_s)
    if settings.flow_start == "forkserver":
        use_forkserver({flow.fn.__module__ for flow, _ in served})
        for flow, options in served:  # held as objects, so each run is forked from the warm server
            runner.add_flow(flow, **options)
    else:  # Prefect's own start: `python -m prefect.engine` per run, which imports the flow's module
        for flow, options in served:
            deployment = flow.to_deployment(**options)
            assert isinstance(deployment, RunnerDeployment)  # to_deployment is sync outside an event loop
            runner.add_deployment(deployment)
    names = ", ".join(f"{flow.name}/{options['name']}" for flow, options in served)
    get_logger("proxyloop.flows").info("serving %s; flow runs start by %s", names, settings.flow_start)
    try:
        asyncio.run(runner.start())
    except (KeyboardInterrupt, TerminationSignal):
        pass


if __name__ == "__main__":
    main()
