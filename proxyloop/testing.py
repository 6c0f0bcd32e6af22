"""Stacks beside the developer's own: settings with their own home and free loopback ports.

For tests and benches (as `prefect.testing` is for Prefect's users); the product never calls it.
"""

from __future__ import annotations

import socket
from pathlib import Path

from ground.settings import Settings
from proxyloop.components import OBJECT_STORE_PORT_OFFSETS, StackError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_object_store_port() -> int:
    """A free port whose SeaweedFS offsets (see OBJECT_STORE_PORT_OFFSETS) are free too."""
    for _ in range(100):
        port = free_port()
        if port + max(OBJECT_STORE_PORT_OFFSETS.values()) < 65536 and all(
                _bindable(port + offset) for offset in OBJECT_STORE_PORT_OFFSETS.values()):
            return port
    raise StackError("no free block of loopback ports for the object store")


def isolated_settings(home: Path, **overrides: object) -> Settings:
    """Settings with their own home and free loopback ports: tests and benches beside a dev stack."""
    redis_port = free_port()
    values: dict[str, object] = {
        "home": home,
        "kafka_bootstrap": f"127.0.0.1:{free_port()}",
        "object_store_url": f"http://127.0.0.1:{free_object_store_port()}",
        "celery_broker": f"redis://127.0.0.1:{redis_port}/0",
        "celery_backend": f"redis://127.0.0.1:{redis_port}/1",
        "prefect_api_url": f"http://127.0.0.1:{free_port()}/api",
        "http_port": free_port(),
        **overrides,
    }
    return Settings(**values)  # type: ignore[arg-type]
