"""Serve every stage as a deployment; `retrain` is started by the dataset threshold event.

Run: `python -m flows.deployments` (started by `proxyloop up`; needs PREFECT_API_URL). At scale, use
a Prefect work pool instead; the triggers and limits are the same.
"""

from __future__ import annotations

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentEventTrigger

from flows.acquisition import acquisition_deployments
from flows.health import ingest_health_flow
from flows.probe import HEALTH_EVENT, health_flow
from flows.reconcile import reconcile_flow
from flows.retrain import check_conditions_flow, evaluate_and_gate_flow, release_flow, retrain
from ground.schemas import DATASET_UPDATED_EVENT
from ground.settings import get_settings

RETRAIN_DEPLOYMENT = "retrain/retrain"
__all__ = ["HEALTH_EVENT", "RETRAIN_DEPLOYMENT", "health_flow", "main", "retrain_trigger"]


def retrain_trigger() -> DeploymentEventTrigger:
    """Start `retrain` whenever the consumer reports a threshold crossing."""
    return DeploymentEventTrigger(
        expect={DATASET_UPDATED_EVENT},
        parameters={
            "expert_total": "{{ event.payload.expert_total }}",
            "proxy_total": "{{ event.payload.proxy_total }}",
        },
    )


def main() -> None:
    settings = get_settings()
    deployments = [
        # concurrency_limit=1: at most one retrain of the policy at a time; later triggers queue.
        retrain.to_deployment(name="retrain", triggers=[retrain_trigger()], concurrency_limit=1),
        check_conditions_flow.to_deployment(name="check-conditions"),
        evaluate_and_gate_flow.to_deployment(name="evaluate-and-gate"),
        release_flow.to_deployment(name="release"),
        health_flow.to_deployment(name="health", triggers=[DeploymentEventTrigger(expect={HEALTH_EVENT})]),
        # Samples consumer lag and raises proxyloop.ingest.lag-growing / consumer-stalled.
        ingest_health_flow.to_deployment(name="ingest-health", interval=settings.health_interval_s),
        # Scheduled only where a Label Studio is configured (a token); runnable by hand everywhere.
        reconcile_flow.to_deployment(
            name="reconcile-labelstudio",
            interval=settings.labelstudio_reconcile_interval_s if settings.labelstudio_token else None,
        ),
    ]
    deployments += acquisition_deployments()  # refresh-acquisition: triggered by the ML backend's webhook
    # query_seconds: how often the runner asks for the runs a trigger created (Prefect's default: 1 s).
    serve(*[d for d in deployments if isinstance(d, RunnerDeployment)], query_seconds=settings.runner_poll_s)


if __name__ == "__main__":
    main()
