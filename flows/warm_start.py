"""Flow runs forked from a warm process instead of spawned cold.

Prefect's runner starts every flow run of a served deployment with
`prefect.flow_engine.run_flow_in_subprocess`, which asks multiprocessing for a "spawn" context: a
fresh interpreter that imports Prefect and the flow's module before the run is marked Running. That
import is most of event → flow start (1.4–1.5 s of it on an idle 2-core machine, more under load,
against ~10 ms for a fork). A "forkserver" context whose server process has preloaded those modules
forks each run from an interpreter that has them already; the server is single-threaded and never
runs the runner's event loop or clients, so fork's usual hazards (threads, open sockets) stay out of
the child. Everything else about the run (pickled call, environment, control channel, cancellation
through the process handle) is Prefect's own code, unchanged.

Prefect exposes no setting for the start method; its direct starter documents patching the module
that holds `run_flow_in_subprocess` as the way to override it, and we replace only the context that
function asks for. `PROXYLOOP_FLOW_START=spawn` keeps Prefect's default (flows.deployments).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
from collections.abc import Iterable
from types import SimpleNamespace


def use_forkserver(preload: Iterable[str]) -> multiprocessing.context.BaseContext:
    """Make the runner fork flow runs from a server that has imported `preload` (module names).

    Call before the runner starts. The server starts and imports `preload` here, and this returns
    once it has, so the first flow run does not pay for those imports itself. Returns the context the runner
    will use.
    """
    import prefect.flow_engine

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(sorted(set(preload) | {"prefect.flow_engine"}))
    # run_flow_in_subprocess reads `multiprocessing.get_context("spawn")` from its module's globals.
    prefect.flow_engine.multiprocessing = SimpleNamespace(  # type: ignore[assignment]
        get_context=lambda method=None: context, context=multiprocessing.context,
    )
    multiprocessing.forkserver.ensure_running()
    ready = context.Process(target=_ready, name="forkserver-ready")  # returns once the preload is done
    ready.start()
    ready.join()
    return context


def _ready() -> None:
    """A no-op run through the server: its start waits for the server's preload to finish."""
