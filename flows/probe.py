"""The `health` flow: an empty flow started by an event, to prove the event → automation → runner path.

Its own module, importing Prefect only, so its start measures Prefect's floor (runner poll, flow
subprocess start, `import prefect`), not the import of the application's flow modules.
"""

from __future__ import annotations

from prefect import flow

HEALTH_EVENT = "proxyloop.health.ping"


@flow(name="health")
def health_flow() -> str:
    """Does nothing: proves the event → automation → runner path works (and measures its floor)."""
    return "ok"
