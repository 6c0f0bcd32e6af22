"""Label Studio's "Start Training" and model-version calls to proxyloop's ML backend (policies/ml_backend.py):
each training call requests a refresh, as a label does. The rest of the protocol: tests/policies/test_ml_backend.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

import policies.ml_backend as ml_backend
from ground.settings import Settings, get_settings
from policies.ml_backend import ML_BACKEND_PREFIX, ScoreCache, router, write_cache

SECRET = {"X-Proxyloop-Secret": "s3cret"}
CONFIG = '<View><Pairwise name="pw" toName="a,b"/></View>'


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path, webhook_secret="s3cret")


@pytest.fixture
def refreshes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, object]]:
    calls: list[tuple[str, object]] = []
    monkeypatch.setattr(ml_backend, "request_refresh", lambda reason, project=None: calls.append((reason, project)))
    return calls


@pytest.fixture
def client(settings: Settings) -> TestClient:
    app = FastAPI()
    app.dependency_overrides[get_settings] = lambda: settings
    app.include_router(router, prefix=ML_BACKEND_PREFIX)
    return TestClient(app)


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
