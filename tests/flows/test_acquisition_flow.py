"""The `refresh-acquisition` flow (flows/acquisition.py): rate limit and deployment, without a server."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from prefect.deployments.runner import RunnerDeployment

import flows.acquisition as acquisition
from ground.schemas import ACQUISITION_REQUESTED_EVENT
from ground.settings import Settings
from policies.acquisition import text_scores
from policies.ml_backend import ScoreCache


def test_deployment_is_triggered_by_the_webhook_event_one_run_at_a_time() -> None:
    deployment = acquisition.refresh_acquisition_flow.to_deployment(**acquisition.acquisition_deployment_options())
    assert isinstance(deployment, RunnerDeployment)
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
    monkeypatch.setattr(acquisition, "production_released", lambda s: True)
    first = acquisition.refresh_acquisition_flow.fn(min_interval_s=60)
    assert first["status"] == "refreshed" and first["open_tasks"] == 2 and len(first["score_quantiles"]) == 3
    assert acquisition.refresh_acquisition_flow.fn(min_interval_s=60)["status"] == "skipped"
    assert acquisition.refresh_acquisition_flow.fn(min_interval_s=0)["status"] == "refreshed"
    assert scored == [0, 0]


def test_before_the_first_release_a_refresh_returns_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each annotation requests a refresh; with nothing released they must not fail one queued run after another."""
    settings = Settings(home=tmp_path)
    monkeypatch.setattr(acquisition, "get_settings", lambda: settings)
    monkeypatch.setattr(acquisition, "get_run_logger", lambda: logging.getLogger("test"))
    monkeypatch.setattr(acquisition, "score_open_tasks", lambda project_id, seed: pytest.fail("scored"))
    assert not acquisition.production_released(settings)
    assert acquisition.refresh_acquisition_flow.fn(min_interval_s=0) == {"status": "no-policy"}


def test_a_refresh_publishes_the_open_task_queue_on_its_run_page(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.artifacts as artifacts

    settings = Settings(home=tmp_path)
    monkeypatch.setattr(acquisition, "get_settings", lambda: settings)
    monkeypatch.setattr(acquisition, "get_run_logger", lambda: logging.getLogger("test"))
    published: list[dict[str, str]] = []
    monkeypatch.setattr(artifacts, "create_markdown_artifact", lambda **kw: published.append(kw))
    # Margins 0 (coin flip: the top score, log 2), ±1, ±2, 4: five tasks, their margin-uncertainty scores known.
    margins = {11: 0.0, 12: 1.0, 13: -1.0, 14: 2.0, 15: 4.0}
    queues = [ScoreCache.from_scores(list(margins)[:2], text_scores([0.0, 1.0], n_labels=3), "appendix-d@1"),
              ScoreCache.from_scores(list(margins), text_scores(list(margins.values()), n_labels=10), "appendix-d@2")]
    monkeypatch.setattr(acquisition, "score_open_tasks", lambda project_id, seed: queues.pop(0))
    monkeypatch.setattr(acquisition, "production_released", lambda s: True)

    acquisition.refresh_acquisition_flow.fn(min_interval_s=0)
    assert "expert labels (first refresh): **3**" in published[0]["markdown"]
    acquisition.refresh_acquisition_flow.fn(min_interval_s=0)

    [_, second] = published
    assert second["key"] == "acquisition-queue"
    markdown = second["markdown"]
    assert markdown.startswith("# Open-task queue: 5 tasks")
    assert "scored by `appendix-d@2`, method `margin`, from 10 expert labels" in markdown
    assert "expert labels since the last refresh (" in markdown and "): **7**" in markdown
    # H(σ(m)) nats: m=0 → 0.6931, ±1 → 0.5822, 2 → 0.3653, 4 → 0.0901
    assert "| min | 0.0901 |" in markdown and "| q25 | 0.3653 |" in markdown and "| q75 | 0.5822 |" in markdown
    assert "| median | 0.5822 |" in markdown and "| max | 0.6931 |" in markdown
    # 5 bins of width log 2 / 5 ≈ 0.139: 0.090 in the first, 0.365 in the third, 0.582 (×2) and 0.693 in the last
    assert "| 0.000–0.139 | 1 |" in markdown and "| 0.277–0.416 | 1 |" in markdown
    assert "| 0.416–0.555 | 0 |" in markdown and "| 0.555–0.693 | 3 |" in markdown
    top = markdown.split("## Label next")[1]
    rows = [line.split(" | ")[1] for line in top.splitlines() if line.startswith("| ") and "rank" not in line]
    assert rows == ["11", "12", "13", "14", "15"]  # by score; the ±1 tie in task-id order
    assert "| 1 | 11 | 0.6931 | a | 0.5 |" in top
