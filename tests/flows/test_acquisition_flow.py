"""The `refresh-acquisition` flow (flows/acquisition.py): rate limit and deployment, without a server."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import flows.acquisition as acquisition
from ground.schemas import ACQUISITION_REQUESTED_EVENT
from ground.settings import Settings
from policies.acquisition import text_scores
from policies.ml_backend import ScoreCache


def test_deployment_is_triggered_by_the_webhook_event_one_run_at_a_time() -> None:
    [deployment] = acquisition.acquisition_deployments()
    assert deployment.name == "refresh-acquisition"
    assert deployment.concurrency_limit == 1
    assert deployment.concurrency_options is not None
    assert deployment.concurrency_options.collision_strategy == "ENQUEUE"
    assert [set(getattr(t, "expect", ())) for t in deployment.triggers] == [{ACQUISITION_REQUESTED_EVENT}]


def test_a_refresh_within_the_interval_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(home=tmp_path)
    monkeypatch.setattr(acquisition, "get_settings", lambda: settings)
    monkeypatch.setattr(acquisition, "get_run_logger", lambda: logging.getLogger("test"))
    scored: list[int] = []

    def fake_score(project_id: int | None, seed: int) -> ScoreCache:
        scored.append(seed)
        return ScoreCache.from_scores([1, 2], text_scores([0.0, 2.0]), "appendix-d@1")

    monkeypatch.setattr(acquisition, "score_open_tasks", fake_score)
    first = acquisition.refresh_acquisition_flow.fn(min_interval_s=60)
    assert first["status"] == "refreshed" and first["open_tasks"] == 2 and len(first["score_quantiles"]) == 3
    assert acquisition.refresh_acquisition_flow.fn(min_interval_s=60)["status"] == "skipped"
    assert acquisition.refresh_acquisition_flow.fn(min_interval_s=0)["status"] == "refreshed"
    assert scored == [0, 0]
