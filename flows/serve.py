"""Serve the flows as deployments with their event triggers.

Run: `python -m flows.serve` (started by `proxyloop up`; needs PREFECT_API_URL). At scale, use
a Prefect work pool instead; the triggers are the same.
"""

from __future__ import annotations

from prefect.events import DeploymentEventTrigger

from flows.retrain import retrain
from ingest.consumer import DATASET_UPDATED_EVENT

RETRAIN_DEPLOYMENT = "retrain/retrain"


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
    # limit=1: at most one retrain of the policy at a time on this runner.
    retrain.serve(name="retrain", triggers=[retrain_trigger()], limit=1)


if __name__ == "__main__":
    main()
