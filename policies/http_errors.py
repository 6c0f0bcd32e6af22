"""Registry and loading errors as HTTP answers: the client hears which policy version is wrong and how, never where
the server keeps it; the server log has the whole message, paths included.

Why at the answer and not in the messages: registry.py, loader.py and the language-model loaders name paths on
purpose, for the operator reading a CLI's error or a log (`proxyloop approve`, `policies.load`). A damaged release
answered every client with the registry's absolute paths (the server's home, user name and mounts).
"""

from __future__ import annotations

import logging
import re

from fastapi import HTTPException

from ground.settings import ML_BACKEND_PATH, Settings

log = logging.getLogger("proxyloop.serve")
REGISTRY, HOME, ELSEWHERE = "<registry>", "<home>", "<server path>"
# An absolute path where a message may put one (after a space, a quote, "(", "=" or "file:"): not a URL's "//host/…",
# nor the rest of "<registry>/demo/1".
_ABSOLUTE = re.compile(r"(?<![\w.~/<>-])/[\w.~+-][^\s'\"(),;\]]*")
# The paths a message names for the client, which stay: this server's routes (the hint a refusal gives).
ROUTES = ("/v1/", "/webhooks/", f"{ML_BACKEND_PATH}/", "/health", "/runs/")


def _hidden(match: re.Match[str]) -> str:
    """Any absolute path but a route is the server's: hidden. Decided on the text alone: looking the path up on this
    host answered a client whether a folder it named exists, and raised (a 500) on a name too long for the disk."""
    path = match.group()
    return path if path.startswith(ROUTES) else ELSEWHERE


def without_server_paths(message: str, settings: Settings) -> str:
    """`message` with the registry's and home's absolute paths as REGISTRY and HOME (so "<registry>/demo/1" still
    says which version), and any other absolute path but a route (a LoRA base, a cache) as ELSEWHERE."""
    roots = {str(settings.home_dir): HOME}
    for registry in (settings.registry_dir, settings.registry_dir.resolve()):
        if registry.is_absolute():
            roots[str(registry)] = REGISTRY
    for root in sorted(roots, key=len, reverse=True):  # the registry, usually inside home, first
        message = message.replace(root, roots[root])
    return _ABSOLUTE.sub(_hidden, message)


def policy_error(status: int, message: str, ref: str, settings: Settings) -> HTTPException:
    """The answer to a request for `ref` that failed with `message`: without the server's paths; a server error
    (the operator's to mend: a damaged release, a missing base) is logged whole, so the operator has them."""
    if status >= 500:
        log.warning("%s: answered %d: %s", ref, status, message)
    return HTTPException(status, without_server_paths(message, settings))
