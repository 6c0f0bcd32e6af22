"""The HTTP app with no Kafka broker: it starts and serves what needs no broker; the Label Studio webhook answers
503 naming PROXYLOOP_KAFKA_BOOTSTRAP, acknowledging nothing, until a broker answers (proxyloop/http.py).

Before, the app opened its producer at startup and could not start while the broker was away (the lifespan
raised after kafka-python's 30 s bootstrap), taking serving, the OpenAI API and the ML backend down with it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ground.settings import Settings
from ingest.bus import ensure_topics, read_topic
from ingest.labelstudio import SECRET_HEADER, webhook_payload
from policies.ml_backend import ML_BACKEND_PREFIX
from proxyloop import http as http_app
from proxyloop import stack
from proxyloop.http import create_app
from proxyloop.testing import isolated_settings

SECRET = "s3cret-hook"
HOOK = {SECRET_HEADER: SECRET}
TEXT = {"prompt": "Capital of France?", "answer_a": "Lyon", "answer_b": "Paris"}


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    """Own home and ports; the broker on its port (memory storage) is started only by a test that wants it."""
    settings = isolated_settings(tmp_path, webhook_secret=SECRET, broker_storage="memory")
    yield settings
    stack.stop_component(settings, "kafka")


def _refused_for_the_broker(http: TestClient, settings: Settings, annotation_id: int) -> None:
    response = http.post("/webhooks/labelstudio", json=webhook_payload(1, annotation_id, TEXT, "right"), headers=HOOK)
    assert response.status_code == 503, response.text
    detail = response.json()["detail"]
    assert "PROXYLOOP_KAFKA_BOOTSTRAP" in detail and settings.kafka_bootstrap in detail


def test_the_app_starts_and_serves_while_the_broker_is_away(settings: Settings) -> None:
    with TestClient(create_app(settings)) as http:  # runs the lifespan, as uvicorn does
        assert http.get("/health").json() == {"status": "ok"}
        assert http.head("/health").status_code == 200  # load balancers and uptime probes send HEAD (was 405)
        assert http.get(f"{ML_BACKEND_PREFIX}/health", headers=HOOK).json()["status"] == "UP"
        assert http.get("/v1/models").status_code == 401  # serving answers (it wants a key), no broker needed
        _refused_for_the_broker(http, settings, 7)
        # The secret is still checked first: a caller without it learns nothing about the broker.
        assert http.post("/webhooks/labelstudio", json=webhook_payload(1, 7, TEXT, "right")).status_code == 401
        # An action that publishes nothing needs no broker: a 503 would count toward Label Studio turning it off.
        ignored = http.post("/webhooks/labelstudio", json={"action": "PROJECT_UPDATED", "project": {"id": 1}},
                            headers=HOOK)
        assert ignored.status_code == 200 and ignored.json()["status"] == "ignored"


def test_a_failed_connect_is_not_retried_by_every_webhook_at_once(settings: Settings,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst against an unreachable broker waited kafka_bootstrap_timeout_s per webhook, in turn."""
    from ingest import proxy_client

    tries: list[int] = []
    connect = proxy_client.connect_producer

    def counted(settings: Settings) -> object:
        tries.append(1)
        return connect(settings)

    monkeypatch.setattr(http_app, "connect_producer", counted)
    with TestClient(create_app(settings)) as http:
        for annotation in range(3):
            _refused_for_the_broker(http, settings, annotation)
    assert tries == [1]


def test_the_webhook_publishes_once_the_broker_is_back(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_app, "RECONNECT_AFTER_S", 0.0)  # the next webhook tries the broker again
    with TestClient(create_app(settings)) as http:
        _refused_for_the_broker(http, settings, 7)
        stack.start_component(settings, stack.component("kafka"), lambda _: None)
        ensure_topics(settings)
        response = http.post("/webhooks/labelstudio", json=webhook_payload(1, 8, TEXT, "left"), headers=HOOK)
        assert response.status_code == 200, response.text
        assert response.json()["event_ids"] == ["labelstudio-annotation-8"]
    # Only the acknowledged label is in the log: the refused one was never published.
    stored = [json.loads(value)["event_id"] for value in read_topic(settings, settings.topic_expert)]
    assert stored == ["labelstudio-annotation-8"]
