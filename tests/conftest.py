"""Shared fixtures: settings on free loopback ports and real services started per session."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxyloop import stack
from proxyloop.settings import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def isolated_settings(home: Path, **overrides: object) -> Settings:
    """Settings for one test session: its own home and free ports; nothing shared with a dev stack."""
    redis_port = free_port()
    values: dict[str, object] = {
        "home": home,
        "kafka_bootstrap": f"127.0.0.1:{free_port()}",
        "celery_broker": f"redis://127.0.0.1:{redis_port}/0",
        "celery_backend": f"redis://127.0.0.1:{redis_port}/1",
        "prefect_api_url": f"http://127.0.0.1:{free_port()}/api",
        "http_port": free_port(),
        **overrides,
    }
    return Settings(**values)  # type: ignore[arg-type]


def export(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `get_settings()` in this process (and children) resolve these settings."""
    from proxyloop.settings import get_settings

    for key, value in stack.child_env(settings).items():
        if key.startswith(("PROXYLOOP_", "PREFECT_")):
            monkeypatch.setenv(key, value)
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def service_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return isolated_settings(tmp_path_factory.mktemp("proxyloop-home"))


@pytest.fixture(scope="session")
def kafka(service_settings: Settings) -> Iterator[str]:
    """A real Kafka-protocol broker (Tansu) with the platform's topics."""
    from ingest.bus import ensure_topics

    component = next(c for c in stack.COMPONENTS if c.name == "kafka")
    stack.start_component(service_settings, component, lambda _: None)
    ensure_topics(service_settings)
    yield service_settings.kafka_bootstrap
    stack.stop_component(service_settings, "kafka")


@pytest.fixture(scope="session")
def redis(service_settings: Settings) -> Iterator[str]:
    component = next(c for c in stack.COMPONENTS if c.name == "redis")
    stack.start_component(service_settings, component, lambda _: None)
    yield service_settings.celery_broker
    stack.stop_component(service_settings, "redis")


@pytest.fixture(autouse=True)
def _no_hub_downloads() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
