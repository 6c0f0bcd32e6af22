"""The `refresh-acquisition` flow (flows/acquisition.py): rate limit and deployment, without a server; its chat
family and malformed tasks are in test_acquisition_chat.py."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import count
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prefect.deployments.runner import RunnerDeployment

import flows.acquisition as acquisition
from ground.schemas import ACQUISITION_REQUESTED_EVENT
from ground.settings import Settings
from ingest.labelstudio.predictions import PredictionPushError, PushSummary
from policies.acquisition import MAX_SCORE, text_scores
from policies.ml_backend import ScoreCache, prediction, read_cache, write_cache


def test_deployment_is_triggered_by_the_webhook_event_one_run_at_a_time() -> None:
    deployment = acquisition.refresh_acquisition_flow.to_deployment(**acquisition.acquisition_deployment_options())
    assert isinstance(deployment, RunnerDeployment)
    assert deployment.name == "refresh-acquisition"
    assert deployment.concurrency_limit == 1
    assert deployment.concurrency_options is not None
    assert deployment.concurrency_options.collision_strategy == "ENQUEUE"
    assert [set(getattr(t, "expect", ())) for t in deployment.triggers] == [{ACQUISITION_REQUESTED_EVENT}]


class Clock:
    """utcnow and sleep for the flow: sleeping advances it, nobody waits."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
        self.slept: list[float] = []

    def __call__(self) -> datetime:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += timedelta(seconds=seconds)


@dataclass
class Runs:
    clock: Clock
    settings: Settings
    scored: list[int]  # the seed of each scoring
    pushed: list[ScoreCache]
    requested: list[datetime]  # the next run's request time (requested_at)
    projects: list[int | None] = field(default_factory=list)  # the project each task was given
    lookups: int = 0  # Label Studio project lookups

    def run(self, requested: datetime, min_interval_s: float = 60) -> dict[str, Any]:
        self.requested.append(requested)
        result: dict[str, Any] = acquisition.refresh_acquisition_flow.fn(min_interval_s=min_interval_s)
        return result


@pytest.fixture
def runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Runs:
    """The flow with a released policy, scoring that takes 5 s of the fake clock, and no Label Studio."""
    clock = Clock()
    state = Runs(clock, Settings(home=tmp_path), [], [], [])
    monkeypatch.setattr(acquisition, "get_settings", lambda: state.settings)
    monkeypatch.setattr(acquisition, "get_run_logger", lambda: logging.getLogger("test"))
    monkeypatch.setattr(acquisition, "utcnow", clock)
    monkeypatch.setattr(acquisition, "sleep", clock.sleep)
    monkeypatch.setattr(acquisition, "requested_at", lambda: state.requested.pop(0))
    monkeypatch.setattr(acquisition, "production_released", lambda s: True)
    monkeypatch.setattr(acquisition, "publish_acquisition_queue", lambda cache, last: None)

    def fake_lookup(settings: Settings, project_id: int | None) -> int:
        state.lookups += 1
        return 7

    def fake_score(project_id: int | None, seed: int) -> ScoreCache:
        state.projects.append(project_id)
        state.scored.append(seed)
        clock.now += timedelta(seconds=5)
        return ScoreCache.from_scores([1, 2], text_scores([0.0, 2.0], n_labels=len(state.scored)), "appendix-d@1")

    def fake_push(project_id: int | None, cache: ScoreCache) -> PushSummary:
        state.projects.append(project_id)
        state.pushed.append(cache)
        return PushSummary(created=len(cache.tasks), updated=0, deleted=0, unchanged=0, seconds=0.1)

    monkeypatch.setattr(acquisition, "project_id_for", fake_lookup)
    monkeypatch.setattr(acquisition, "score_open_tasks", fake_score)
    monkeypatch.setattr(acquisition, "push_to_labelstudio", fake_push)
    return state


def test_a_refresh_writes_the_cache_and_pushes_it_to_label_studio(runs: Runs) -> None:
    t0 = runs.clock.now
    first = runs.run(t0)
    assert first["status"] == "refreshed" and first["open_tasks"] == 2 and len(first["score_quantiles"]) == 3
    assert first["labelstudio_tasks_updated"] == 2 and runs.clock.slept == []
    cache = read_cache(runs.settings)
    assert cache is not None and cache.started_at == t0 and cache.refreshed_at == t0 + timedelta(seconds=5)
    assert runs.pushed == [cache]
    assert runs.lookups == 1 and runs.projects == [7, 7]  # one project lookup per refresh, for both tasks


def test_a_run_requested_before_the_last_refresh_started_is_skipped(runs: Runs) -> None:
    t0 = runs.clock.now
    runs.run(t0)
    # A label whose run was requested just before that refresh began: the refresh read it already.
    assert runs.run(t0 - timedelta(seconds=1))["status"] == "skipped"
    assert runs.scored == [0] and runs.clock.slept == [] and len(runs.pushed) == 1


def test_a_cache_that_does_not_say_when_its_refresh_started_covers_no_run(runs: Runs) -> None:
    """A cache written before refreshes recorded their start: which labels it read is unknown, so refresh."""
    write_cache(runs.settings, ScoreCache(refreshed_at=runs.clock.now))
    assert runs.run(runs.clock.now - timedelta(seconds=30), min_interval_s=20)["status"] == "refreshed"
    assert runs.clock.slept == [pytest.approx(20.0)] and runs.scored == [0]


def test_a_run_requested_after_the_last_refresh_started_waits_and_refreshes(runs: Runs) -> None:
    t0 = runs.clock.now
    runs.run(t0)  # started t0, ended t0 + 5 s
    # A burst of labels during and after that refresh: one run waits out the interval and refreshes...
    second = runs.run(t0 + timedelta(seconds=2), min_interval_s=60)
    assert second["status"] == "refreshed" and runs.clock.slept == [pytest.approx(60.0)]
    assert runs.scored == [0, 1] and len(runs.pushed) == 2
    cache = read_cache(runs.settings)
    assert cache is not None and cache.started_at == t0 + timedelta(seconds=65)
    # ...and covers the rest of the burst, queued behind it: two refreshes for the whole burst, no label lost.
    for offset in (3, 30, 64):
        assert runs.run(t0 + timedelta(seconds=offset))["status"] == "skipped"
    assert runs.scored == [0, 1] and runs.clock.slept == [pytest.approx(60.0)]
    # A run requested once the interval has passed refreshes at once; with no interval, always at once.
    runs.clock.now += timedelta(seconds=120)
    assert runs.run(runs.clock.now)["status"] == "refreshed"
    assert runs.run(runs.clock.now, min_interval_s=0)["status"] == "refreshed"
    assert runs.scored == [0, 1, 2, 3] and len(runs.clock.slept) == 1


def test_a_failed_push_fails_the_run_after_the_cache_is_written(runs: Runs, monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(project_id: int | None, cache: ScoreCache) -> PushSummary:
        raise PredictionPushError("1 of 2 prediction requests to project 3 failed; the first: 500")

    monkeypatch.setattr(acquisition, "push_to_labelstudio", refused)
    with pytest.raises(RuntimeError, match="in the cache .* but not in Label Studio's task list: 1 of 2"):
        runs.run(runs.clock.now)
    assert read_cache(runs.settings) is not None


def test_the_push_writes_what_predict_serves_and_selects_the_version(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per task, our prediction updated in place, created, or left alone; extra ones of ours deleted, other
    models' kept; labelled tasks score 0 with no suggestion; then the project shows our version."""
    settings = Settings(home=tmp_path)
    cache = ScoreCache.from_scores([1, 2, 3], text_scores([0.0, 2.0, -1.0], n_labels=4), "appendix-d@2")
    same = prediction(3, cache)
    held = [SimpleNamespace(id=10, task=1, model_version="appendix-d@1", result=[], score=0.5),
            SimpleNamespace(id=11, task=1, model_version="appendix-d@1", result=[], score=0.4),
            SimpleNamespace(id=12, task=1, model_version="someone-else", result=[], score=0.9),
            SimpleNamespace(id=13, task=3, **same),
            SimpleNamespace(id=14, task=4, model_version="proxy", result=[], score=MAX_SCORE)]
    client = FakeLabelStudio(held, tasks={1: False, 2: False, 3: False, 4: True, 5: False})
    monkeypatch.setattr(acquisition, "get_settings", lambda: settings)
    monkeypatch.setattr(acquisition, "client_for", lambda s: client)
    monkeypatch.setattr(acquisition, "project_id_for", lambda s, pid: 7)
    summary = acquisition.push_to_labelstudio.fn(None, cache)
    assert (summary.created, summary.updated, summary.deleted, summary.unchanged) == (2, 2, 1, 1)
    by_task = {p.task: p for p in client.held.values() if p.model_version != "someone-else"}
    assert set(client.held) >= {10, 12, 13, 14} and 11 not in client.held
    for task_id, labelled in client.labelled.items():
        wanted = prediction(task_id, cache, labelled=labelled)
        got = by_task[task_id]
        assert (got.result, got.score, got.model_version) == (wanted["result"], wanted["score"], "appendix-d@2")
    assert by_task[4].score == 0.0 and by_task[4].result == []  # labelled: nothing left to ask
    assert by_task[5].score == pytest.approx(MAX_SCORE)  # not scored yet: asked about early, as /predict says
    assert client.project_version == "appendix-d@2"


class FakeLabelStudio:
    """The parts of label_studio_sdk's client the push uses, on a dict of predictions."""

    def __init__(self, held: list[SimpleNamespace], tasks: dict[int, bool]) -> None:
        self.held = {int(p.id): p for p in held}
        self.labelled = tasks
        self.tasks = SimpleNamespace(list=lambda project, fields, page_size: [
            SimpleNamespace(id=t, annotations=[{"id": 1}] if done else []) for t, done in tasks.items()])
        self.project_version = "proxyloop"
        self.predictions = SimpleNamespace(list=lambda project: list(self.held.values()),
                                           create=self._create, update=self._update, delete=self.held.pop)
        self.projects = SimpleNamespace(get=lambda pid: SimpleNamespace(model_version=self.project_version),
                                        update=self._select)
        self._ids = count(100)

    def _create(self, task: int, project: int, **fields: Any) -> SimpleNamespace:
        prediction = SimpleNamespace(id=next(self._ids), task=task, **fields)
        self.held[prediction.id] = prediction
        return prediction

    def _update(self, id: int, **fields: Any) -> SimpleNamespace:
        vars(self.held[id]).update(fields)
        return self.held[id]

    def _select(self, pid: int, model_version: str) -> None:
        self.project_version = model_version


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
    monkeypatch.setattr(acquisition, "project_id_for", lambda s, project_id: 7)
    monkeypatch.setattr(acquisition, "score_open_tasks", lambda project_id, seed: queues.pop(0))
    monkeypatch.setattr(acquisition, "production_released", lambda s: True)
    monkeypatch.setattr(acquisition, "push_to_labelstudio",
                        lambda project_id, cache: PushSummary(created=0, updated=0, deleted=0, unchanged=0, seconds=0))

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


# Chat tasks (text pairs): scored under the chat release's stage-1 mode mixture (flows/acquisition_chat.py).
