"""Send one Prefect event and know whether the server got it.

Why not `prefect.events.emit_event`: it only queues the event for a background worker, and that worker
logs and drops what it cannot deliver ("Service 'EventsWorker' failed with N pending items"), so a
caller never learns that the `retrain` or `refresh-acquisition` trigger was lost. Here the event goes
over Prefect's own events client, in this thread, and the call returns only once the server answered a
ping sent after it (what the client itself calls a checkpoint); anything else raises `PrefectUnreachable`,
so the caller can keep its state and try again. Prefect is imported lazily: the store path never needs it.
"""

from __future__ import annotations

import asyncio
from typing import Any

# Retries inside Prefect's client before giving up: a refused connection fails in well under a second,
# so a Prefect server that is down costs the caller little; the timeout bounds one that hangs.
RECONNECTION_ATTEMPTS = 2
DEFAULT_TIMEOUT_S = 15.0


class PrefectUnreachable(RuntimeError):
    """The event did not reach a Prefect server (down, no PREFECT_API_URL, or no answer in time)."""


def emit(event: str, resource: dict[str, str], payload: dict[str, Any], timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Send `event` and return once the Prefect server has it; raise PrefectUnreachable otherwise.

    Synchronous, for the consumer loop and FastAPI's thread pool; not for a thread running an event loop.
    """
    from prefect.events.schemas.events import Event
    from prefect.settings import PREFECT_API_URL

    api_url = PREFECT_API_URL.value()
    if not api_url:  # Prefect's own fallback would start a throwaway server nobody's triggers listen on
        raise PrefectUnreachable(f"event {event} not sent: PREFECT_API_URL is not set")
    try:
        asyncio.run(_send(Event(event=event, resource=resource, payload=payload), timeout_s))
    except Exception as exc:  # websockets, OS and handshake errors alike: the event is not known delivered
        detail = (f"no answer within {timeout_s:.0f} s" if isinstance(exc, TimeoutError)
                  else f"{type(exc).__name__}: {str(exc)[:300]}")
        raise PrefectUnreachable(f"event {event} not delivered to the Prefect server at {api_url} ({detail})") from exc


async def _send(event: Any, timeout_s: float) -> None:
    from prefect.events.clients import get_events_client

    async with asyncio.timeout(timeout_s):
        # checkpoint_every=1: the client pings after each event and waits for the pong, so a return means
        # the server read the event, not only that it sat in a socket buffer.
        async with get_events_client(reconnection_attempts=RECONNECTION_ATTEMPTS, checkpoint_every=1) as client:
            await client.emit(event)
