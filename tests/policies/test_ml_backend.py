"""Label Studio's ML-backend protocol (policies/ml_backend.py): shapes, auth, the score cache."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

import policies.ml_backend as ml_backend
from ground.settings import Settings, get_settings
from policies.acquisition import MAX_SCORE, text_scores
from policies.ml_backend import ML_BACKEND_PREFIX, ScoreCache, read_cache, router, write_cache

SECRET = {"X-Proxyloop-Secret": "s3cret"}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path, webhook_secret="s3cret")


@pytest.fixture
def client(settings: Settings) -> TestClient:
    app = FastAPI()
    app.dependency_overrides[get_settings] = lambda: settings
    app.include_router(router, prefix=ML_BACKEND_PREFIX)
    return TestClient(app)


def _cache(settings: Settings) -> None:
    scores = text_scores([3.0, -3.0], proxy_margin=[3.0, 3.0], n_labels=4)
    write_cache(settings, ScoreCache.from_scores([11, 12], scores, "chat@3"))


def test_health_and_setup_answer_as_label_studio_expects(client: TestClient, settings: Settings) -> None:
    health = client.get(f"{ML_BACKEND_PREFIX}/health", headers=SECRET)
    assert health.status_code == 200 and health.json()["status"] == "UP"
    setup = client.post(f"{ML_BACKEND_PREFIX}/setup", headers=SECRET,
                        json={"project": "1.1700000000", "schema": "<View/>", "hostname": "http://ls",
                              "access_token": "t", "model_version": None, "extra_params": None})
    assert setup.status_code == 200 and setup.json() == {"model_version": "proxy"}
    _cache(settings)
    assert client.post(f"{ML_BACKEND_PREFIX}/setup", headers=SECRET, json={}).json() == {"model_version": "chat@3"}


def test_predict_returns_one_prediction_per_task_in_order(client: TestClient, settings: Settings) -> None:
    _cache(settings)
    tasks = [{"id": 12, "data": {"prompt": "p", "answer_a": "a", "answer_b": "b"}}, {"id": 11, "data": {}},
             {"id": 99, "data": {}}]
    body = client.post(f"{ML_BACKEND_PREFIX}/predict", headers=SECRET,
                       json={"tasks": tasks, "project": "1.1700000000", "label_config": "<View/>", "params": {}}).json()
    results = body["results"]
    assert [set(r) for r in results] == [{"result", "score", "model_version"}] * 3
    assert body["model_version"] == "chat@3"
    # Task 12: the policy prefers b, the proxy a: a disagreement, scored above task 11 (both agree on a).
    assert results[0]["result"] == [{"from_name": "pw", "to_name": "pw", "type": "pairwise", "origin": "prediction",
                                     "value": {"selected": "right"}}]
    assert results[1]["result"][0]["value"] == {"selected": "left"}
    assert results[0]["score"] > results[1]["score"]
    # Never scored: no pre-annotation, the highest score (asked about early).
    assert results[2] == {"result": [], "score": pytest.approx(MAX_SCORE), "model_version": "chat@3"}
    assert client.post(f"{ML_BACKEND_PREFIX}/predict", headers=SECRET, json={"tasks": []}).json()["results"] == []
    write_cache(settings, ScoreCache.from_scores([1, 12], text_scores([3.0, -3.0], proxy_margin=[3.0, 3.0],
                                                                      n_labels=4), "chat@3"))
    one, true = (client.post(f"{ML_BACKEND_PREFIX}/predict", headers=SECRET, json={"tasks": [{"id": task}]}).json()
                 for task in (1, True))
    assert one["results"][0]["result"] and true["results"][0]["result"] == []  # JSON true is no task 1


def test_a_task_with_annotations_gets_score_0_and_no_suggestion(client: TestClient, settings: Settings) -> None:
    """Labelled: nothing left to ask, below every open task; scored or not, with or without a cache."""
    tasks = [{"id": 12, "data": {}, "annotations": [{"id": 5, "result": []}]}, {"id": 99, "annotations": [{"id": 6}]},
             {"id": 11, "data": {}, "annotations": []}]
    cold = client.post(f"{ML_BACKEND_PREFIX}/predict", headers=SECRET, json={"tasks": tasks[:1]}).json()
    assert cold["results"] == [{"result": [], "score": 0.0, "model_version": "proxy"}]
    _cache(settings)
    results = client.post(f"{ML_BACKEND_PREFIX}/predict", headers=SECRET, json={"tasks": tasks}).json()["results"]
    assert results[:2] == [{"result": [], "score": 0.0, "model_version": "chat@3"}] * 2
    assert results[2]["result"] and results[2]["score"] > 0  # the open one keeps its suggestion and score


def test_our_model_versions_are_the_policys_and_the_unscored_one() -> None:
    assert ml_backend.is_our_version("proxy", "chat") and ml_backend.is_our_version("chat@3", "chat")
    assert not any(ml_backend.is_our_version(v, "chat") for v in ("chatty@1", "proxyloop", "", None))
    both = ("appendix-d", "chat")  # a project with both kinds: either policy's versions, alone or combined
    assert all(ml_backend.is_our_version(v, *both) for v in ("chat@3", "appendix-d@2", "appendix-d@2+chat@3"))
    assert not ml_backend.is_our_version("chatty@1", *both)


def test_predict_serves_feature_and_chat_tasks_from_one_combined_cache(client: TestClient, settings: Settings) -> None:
    """Each kind scored by its own scorer, one cache: /predict answers both, under the one combined version."""
    feature = ScoreCache.from_scores([21], text_scores([2.0], n_labels=5), "appendix-d@2")
    chat = ScoreCache.from_scores([31, 32], text_scores([-1.0, 0.5], n_labels=3), "chat@3")
    combined = ScoreCache.combined([feature, chat])
    assert (combined.model_version, combined.method, combined.n_labels) == ("appendix-d@2+chat@3", "margin+margin", 8)
    assert ScoreCache.combined([chat]) == chat and ScoreCache.combined([]).model_version == "proxy"
    with pytest.raises(ValueError, match=r"tasks \[31\] scored by both chat@3"):
        ScoreCache.combined([chat, chat.model_copy(update={"tasks": {31: chat.tasks[31]}})])
    write_cache(settings, combined)
    tasks = [{"id": 21, "data": {"x": [0.1], "y_a": 0, "y_b": 1}},
             {"id": 31, "data": {"prompt": "p", "answer_a": "a", "answer_b": "b"}}, {"id": 32, "data": {}}]
    body = client.post(f"{ML_BACKEND_PREFIX}/predict", headers=SECRET, json={"tasks": tasks}).json()
    assert body["model_version"] == "appendix-d@2+chat@3"
    assert [r["result"][0]["value"]["selected"] for r in body["results"]] == ["left", "right", "left"]
    assert [r["score"] for r in body["results"]] == pytest.approx([combined.tasks[t].score for t in (21, 31, 32)])


def test_every_route_needs_the_secret_in_the_header_or_basic_auth(client: TestClient) -> None:
    for method, path in (("get", "/health"), ("post", "/setup"), ("post", "/predict"), ("post", "/webhook")):
        response = client.request(method, f"{ML_BACKEND_PREFIX}{path}", json={})
        assert response.status_code == 401, path
        assert client.request(method, f"{ML_BACKEND_PREFIX}{path}", json={},
                              headers={"X-Proxyloop-Secret": "wrong"}).status_code == 401
    basic = base64.b64encode(b"labelstudio:s3cret").decode()
    assert client.get(f"{ML_BACKEND_PREFIX}/health", headers={"Authorization": f"Basic {basic}"}).status_code == 200
    wrong = base64.b64encode(b"labelstudio:nope").decode()
    assert client.get(f"{ML_BACKEND_PREFIX}/health", headers={"Authorization": f"Basic {wrong}"}).status_code == 401


def test_webhook_acknowledges_and_requests_a_refresh(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, object]] = []
    monkeypatch.setattr(ml_backend, "request_refresh", lambda reason, project=None: calls.append((reason, project)))
    response = client.post(f"{ML_BACKEND_PREFIX}/webhook", headers=SECRET,
                           json={"action": "ANNOTATION_CREATED", "project": {"id": 3}, "annotation": {"id": 1}})
    assert response.status_code == 201
    assert response.json() == {"status": "ok", "action": "ANNOTATION_CREATED", "refresh": "requested"}
    assert calls == [("ANNOTATION_CREATED", 3)]
    ignored = client.post(f"{ML_BACKEND_PREFIX}/webhook", headers=SECRET, json={"action": "PROJECT_UPDATED"})
    assert ignored.status_code == 201 and ignored.json()["status"] == "ignored"
    assert client.post(f"{ML_BACKEND_PREFIX}/webhook", headers=SECRET, json={"no": "action"}).status_code == 422
    lone_surrogate = b'{"action": "\\ud800"}'  # echoed back, it could not be encoded: a 500
    odd = client.post(f"{ML_BACKEND_PREFIX}/webhook", headers={**SECRET, "Content-Type": "application/json"},
                      content=lone_surrogate)
    assert odd.status_code == 422 and "not a Label Studio action name" in odd.json()["detail"]

    def unreachable(reason: str, project: object = None) -> None:
        raise ConnectionError("prefect down")

    monkeypatch.setattr(ml_backend, "request_refresh", unreachable)
    down = client.post(f"{ML_BACKEND_PREFIX}/webhook", headers=SECRET, json={"action": "ANNOTATION_UPDATED"})
    assert down.status_code == 201 and down.json()["refresh"].startswith("not requested")



@pytest.mark.parametrize("body, detail", [
    (b"[" * 100_000 + b"]" * 100_000, "webhook body is JSON nested too deeply to parse"),  # was a RecursionError 500
    (b'{"action": "ANNOTATION_CREATED"', "webhook body is not JSON: "),
])
def test_webhook_refuses_a_body_that_does_not_parse_with_422(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, body: bytes, detail: str,
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(ml_backend, "request_refresh", lambda reason, project=None: calls.append(reason))
    response = client.post(f"{ML_BACKEND_PREFIX}/webhook", content=body,
                           headers={**SECRET, "content-type": "application/json"})
    assert response.status_code == 422 and response.json()["detail"].startswith(detail)
    assert calls == []

def test_cache_round_trip_and_bad_files(settings: Settings) -> None:
    assert read_cache(settings) is None
    _cache(settings)
    cache = read_cache(settings)
    assert cache is not None and set(cache.tasks) == {11, 12} and cache.n_labels == 4
    assert cache.method == "proxy_disagreement"
    ml_backend.cache_path(settings).write_text("{not json")
    assert read_cache(settings) is None
    with pytest.raises(ValueError, match="1 task ids for 2 scores"):
        ScoreCache.from_scores([1], text_scores(np.zeros(2)), "v")


def test_webhook_says_the_refresh_was_not_requested_while_prefect_is_down(client: TestClient) -> None:
    """The real event path, to a Prefect API where nothing listens: `emit_event` only queued the event and its
    worker dropped it, so the answer said "requested" for a refresh no server would ever start."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from proxyloop.testing import free_port

    down = f"http://127.0.0.1:{free_port()}/api"
    with temporary_settings(updates={PREFECT_API_URL: down}):
        response = client.post(f"{ML_BACKEND_PREFIX}/webhook", headers=SECRET,
                               json={"action": "ANNOTATION_CREATED", "project": {"id": 3}})
    assert response.status_code == 201  # the label itself travels by the ingest webhook: still acknowledged
    refresh = response.json()["refresh"]
    assert refresh.startswith("not requested: ") and down in refresh, refresh


# Label Studio's "Start Training" and model-version calls: each training call requests a refresh, as a label does.

CONFIG = '<View><Pairwise name="pw" toName="a,b"/></View>'


@pytest.fixture
def refreshes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, object]]:
    calls: list[tuple[str, object]] = []
    monkeypatch.setattr(ml_backend, "request_refresh", lambda reason, project=None: calls.append((reason, project)))
    return calls


def test_start_training_on_the_webhook_requests_a_refresh(
    client: TestClient, refreshes: list[tuple[str, object]],
) -> None:
    """Label Studio with the START_TRAINING flag: was answered "ignored", and nothing was retrained."""
    response = client.post(f"{ML_BACKEND_PREFIX}/webhook", headers=SECRET,
                           json={"action": "START_TRAINING", "project": {"id": 3, "label_config": CONFIG}})
    assert response.status_code == 201
    assert response.json() == {"status": "ok", "action": "START_TRAINING", "refresh": "requested"}
    assert refreshes == [("START_TRAINING", 3)]


@pytest.mark.parametrize("body", [{"annotations": [], "project": "3.1", "label_config": CONFIG}, None],
                         ids=["label-studio-body", "no-body"])
def test_train_requests_a_refresh(client: TestClient, refreshes: list[tuple[str, object]], body: object) -> None:
    """Label Studio without the flag POSTs /train: was a 404, shown there as a failed training."""
    response = client.post(f"{ML_BACKEND_PREFIX}/train", headers=SECRET, json=body)
    assert response.status_code == 201
    assert response.json() == {"status": "ok", "action": "train", "refresh": "requested"}
    assert refreshes == [("train", "3.1" if body else None)]


def test_train_says_so_when_the_refresh_could_not_be_requested(
    client: TestClient, monkeypatch: pytest.MonkeyPatch,
) -> None:
    def unreachable(reason: str, project: object = None) -> None:
        raise ConnectionError("prefect down")

    monkeypatch.setattr(ml_backend, "request_refresh", unreachable)
    response = client.post(f"{ML_BACKEND_PREFIX}/train", headers=SECRET, json={"project": "3.1"})
    assert response.status_code == 201 and response.json()["refresh"] == "not requested: prefect down"
    assert client.post(f"{ML_BACKEND_PREFIX}/train", headers=SECRET, content=b"{not json").status_code == 422


def test_versions_lists_the_current_model_version(client: TestClient, settings: Settings) -> None:
    """Newer Label Studio lists the backend's versions with GET /versions: was a 404."""
    response = client.get(f"{ML_BACKEND_PREFIX}/versions", headers=SECRET)
    assert response.status_code == 200 and response.json() == {"versions": ["proxy"]}
    write_cache(settings, ScoreCache(model_version="chat@3"))
    assert client.get(f"{ML_BACKEND_PREFIX}/versions", headers=SECRET).json() == {"versions": ["chat@3"]}


def test_train_and_versions_need_the_secret(client: TestClient) -> None:
    assert client.post(f"{ML_BACKEND_PREFIX}/train", json={}).status_code == 401
    assert client.get(f"{ML_BACKEND_PREFIX}/versions").status_code == 401
