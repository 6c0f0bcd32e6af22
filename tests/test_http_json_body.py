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
