"""The 413 size limit (proxyloop.http.RequestSizeLimit, PROXYLOOP_MAX_REQUEST_BYTES) holds for the bytes
received: a chunked body declares no Content-Length, and a limit that only read the header let any size in."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

import policies.ml_backend as ml_backend
from ingest.labelstudio import webhook_payload
from policies.ml_backend import ML_BACKEND_PREFIX
from proxyloop.http import RequestSizeLimit
from proxyloop.testing import free_port
from tests.ingest.test_labelstudio_webhook_route import HOOK, TEXT, RecordingProducer, serve

LIMIT = 4096
OVER = f"request body exceeds the limit of {LIMIT} bytes (PROXYLOOP_MAX_REQUEST_BYTES)"
JSON = {"content-type": "application/json"}


def _body(prompt_chars: int) -> bytes:
    return json.dumps(webhook_payload(1, 9, {**TEXT, "prompt": "p" * prompt_chars}, "left")).encode()


def _chunks(body: bytes, size: int = 1000) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start:start + size]


@pytest.fixture
def app(tmp_path: Path) -> tuple[TestClient, RecordingProducer]:
    return serve(tmp_path, max_request_bytes=LIMIT)


def _says(body: dict[str, Any], reason: str) -> bool:
    """The 413's body: this app's `detail` and OpenAI's `error` object, both with the reason."""
    return body == {"detail": reason, "error": {"message": reason, "type": "invalid_request_error", "param": None,
                                                "code": "request_too_large"}}


def test_a_chunked_body_over_the_limit_gets_413_and_nothing_is_published(
    app: tuple[TestClient, RecordingProducer],
) -> None:
    http, producer = app
    response = http.post("/webhooks/labelstudio", content=_chunks(_body(20_000)), headers={**HOOK, **JSON})
    assert "content-length" not in response.request.headers  # what let it past the old check
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert response.status_code == 413 and _says(response.json(), OVER)
    assert producer.sent == []


def test_a_chunked_body_under_the_limit_is_served(app: tuple[TestClient, RecordingProducer]) -> None:
    http, producer = app
    response = http.post("/webhooks/labelstudio", content=_chunks(_body(100), size=64), headers={**HOOK, **JSON})
    assert response.status_code == 200 and len(producer.sent) == 1, response.text


def test_a_declared_length_over_the_limit_is_refused_before_the_app_runs(
    app: tuple[TestClient, RecordingProducer],
) -> None:
    http, producer = app
    body = _body(20_000)
    response = http.post("/webhooks/labelstudio", content=body, headers={**HOOK, **JSON})
    assert response.status_code == 413
    assert _says(response.json(), f"request body of {len(body)} bytes exceeds the limit of {LIMIT} bytes "
                                  "(PROXYLOOP_MAX_REQUEST_BYTES)")
    assert producer.sent == []


def test_the_ml_backend_webhook_gets_413_for_a_chunked_body_over_the_limit(
    app: tuple[TestClient, RecordingProducer], monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(ml_backend, "request_refresh", lambda reason, project=None: calls.append(reason))
    http, _ = app
    response = http.post(f"{ML_BACKEND_PREFIX}/webhook", content=_chunks(_body(20_000)), headers={**HOOK, **JSON})
    assert response.status_code == 413 and _says(response.json(), OVER)
    assert calls == []


async def _call(app: RequestSizeLimit, chunks: list[bytes]) -> list[Message]:
    """One POST through the ASGI app, its body in `chunks` (one http.request message each); what it sent."""
    pending = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[Message] = []

    async def receive() -> Message:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope: dict[str, Any] = {"type": "http", "method": "POST", "path": "/", "headers": []}
    await app(scope, receive, send)
    return sent


@pytest.mark.anyio
async def test_the_body_is_counted_across_chunks_and_the_apps_own_answer_is_replaced() -> None:
    """An app that swallows the refusal (a broad except) and answers 200 still gets its client a 413; it was
    handed no byte past the limit."""
    handed: list[int] = []

    async def swallowing(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            while True:
                message = await receive()
                handed.append(len(message.get("body", b"")))
                if not message.get("more_body"):
                    break
        except Exception:
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"swallowed"})

    sent = await _call(RequestSizeLimit(swallowing, max_bytes=LIMIT), [b"x" * 1000] * 10)
    assert sum(handed) == 4000  # four chunks; the fifth would pass the limit and was never handed over
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 413 and _says(json.loads(sent[1]["body"]), OVER)
    at_limit = await _call(RequestSizeLimit(swallowing, max_bytes=LIMIT), [b"x" * 1000] * 4 + [b"x" * 96])
    assert at_limit[0]["status"] == 200 and handed[-5:] == [1000] * 4 + [96]  # exactly the limit: served


@pytest.mark.anyio
async def test_a_refusal_after_the_app_started_answering_is_not_masked() -> None:
    """Too late for a 413: the error goes on (the server drops the connection), no second response starts."""

    async def early(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while (await receive()).get("more_body"):
            pass

    with pytest.raises(Exception, match="exceeds the limit"):
        await _call(RequestSizeLimit(early, max_bytes=LIMIT), [b"x" * 1000] * 10)


@pytest.fixture
def uvicorn_app(app: tuple[TestClient, RecordingProducer]) -> Iterator[tuple[str, RecordingProducer]]:
    """The app under a real uvicorn (a thread, lifespan off), where chunked bodies arrive as they do in production."""
    http, producer = app
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(http.app, host="127.0.0.1", port=port, lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", producer
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_chunked_body_over_the_limit_gets_413_from_uvicorn(uvicorn_app: tuple[str, RecordingProducer]) -> None:
    url, producer = uvicorn_app
    with httpx.Client(base_url=url, timeout=30) as client:
        response = client.post("/webhooks/labelstudio", content=_chunks(_body(20_000)), headers={**HOOK, **JSON})
        assert response.status_code == 413 and _says(response.json(), OVER)
        ok = client.post("/webhooks/labelstudio", content=_chunks(_body(100), size=64), headers={**HOOK, **JSON})
        assert ok.status_code == 200, ok.text
    assert [json.loads(value)["event_id"] for _, _, value in producer.sent] == ["labelstudio-annotation-9"]
