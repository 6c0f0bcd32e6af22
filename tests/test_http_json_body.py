"""A request body that does not parse as JSON, on the routes whose body FastAPI parses (chat completions, the
profile and predict APIs, the ML backend's setup and predict): a 422 whose message says the body is not JSON and
where it broke, in the app's envelope (OpenAI's `error` object beside `detail`). It said "6: JSON decode error"
with param "6"; a body that was not UTF-8 or was nested too deeply got a 400 "There was an error parsing the body".
(The routes that read their body themselves, ingest.web.json_body, are tested with them.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from policies.ml_backend import ML_BACKEND_PREFIX
from proxyloop.http import create_app
from proxyloop.testing import isolated_settings

ROUTES = ("/v1/chat/completions", "/v1/users/u1/responses", "/v1/policies/demo/predict",
          f"{ML_BACKEND_PREFIX}/setup", f"{ML_BACKEND_PREFIX}/predict")
HEADERS = {"Authorization": "Bearer key-1", "content-type": "application/json"}
NOT_JSON = "request body is not JSON: "
BODIES = {
    "truncated": (b'{"model": "chat",\n "messages": ', f"{NOT_JSON}Expecting value: line 2 column 14 (char 31)"),
    "not UTF-8": (b'{"model": "\xff"}', f"{NOT_JSON}'utf-8' codec can't decode byte 0xff in position 11"),
    "nested too deeply": (b"[" * 100_000 + b"]" * 100_000, "request body is JSON nested too deeply to parse"),
}


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    home: Path = tmp_path_factory.mktemp("json-body")
    return TestClient(create_app(isolated_settings(home, api_keys="key-1", webhook_secret="secret-1")))


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("body", BODIES.values(), ids=BODIES.keys())
def test_a_body_that_is_not_json_is_a_422_saying_so_and_where(
    http: TestClient, route: str, body: tuple[bytes, str],
) -> None:
    sent, expected = body
    reply = http.post(route, content=sent, headers=HEADERS)
    assert reply.status_code == 422, reply.text
    answer: dict[str, Any] = reply.json()
    assert answer["error"]["message"].startswith(expected), answer
    assert (answer["error"]["type"], answer["error"]["param"]) == ("invalid_request_error", None)
    [error] = answer["detail"]  # FastAPI's shape of a validation error, the reason in its msg
    assert (error["type"], error["loc"][0], error["msg"]) == ("json_invalid", "body", answer["error"]["message"])


@pytest.mark.parametrize("route", ROUTES)
def test_json_sent_without_a_json_content_type_is_told_which_header(http: TestClient, route: str) -> None:
    """curl -d sends form data: FastAPI parses nothing, and its 422 said "Input should be a valid dictionary" of JSON
    that was fine. A missing field in a body sent as JSON is still FastAPI's own message."""
    body = b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}]}'
    headers = {"Authorization": "Bearer key-1", "X-Proxyloop-Secret": "secret-1",
               "content-type": "application/x-www-form-urlencoded"}
    reply = http.post(route, content=body, headers=headers)
    assert reply.status_code == 422, reply.text
    message = reply.json()["error"]["message"]
    assert "Content-Type: application/json" in message and "application/x-www-form-urlencoded" in message, message
    reply = http.post(route, content=b"{}", headers=HEADERS)
    assert "Content-Type: application/json" not in reply.text, reply.text
