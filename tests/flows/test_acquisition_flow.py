"""The `refresh-acquisition` flow (flows/acquisition.py): rate limit and deployment, without a server; the chat
family's stage 1 and tasks (flows/acquisition_chat.py), and both families' predictions in a real Label Studio."""

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
from sqlalchemy.orm import Session

import flows.acquisition as acquisition
from ground.schemas import ACQUISITION_REQUESTED_EVENT, PairwiseText
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


def _release_chat_policy(settings: Settings, stage1_checkpoints: list[str], run_id: str = "run-chat") -> None:
    """A chat retrain run as the store keeps it (stage 1's checkpoints) and its release as chat@production."""
    from ground.schemas import CheckpointRef, RetrainRunRecord, TrainingRecord
    from ingest.store import make_engine, record_run
    from policies.registry import register

    stage1 = TrainingRecord(run_id=f"{run_id}-stage1", device="cpu", worker="test", final_loss=0.0, seconds=0.0,
                            checkpoints=[CheckpointRef(step=i, path=p) for i, p in enumerate(stage1_checkpoints)],
                            task_id=f"{run_id}-stage1", queue="gpu")
    with Session(make_engine(settings.resolved_store_url)) as session:
        record_run(session, RetrainRunRecord(run_id=run_id, stage1=stage1), "released")
        session.commit()
    register(settings.registry_dir, settings.chat_policy_name, None, {"family": "causal_lm"},
             {"flow_run_id": run_id}, alias="production")


def test_without_a_chat_stage_1_chat_tasks_are_skipped_with_the_reason(tmp_path: Path) -> None:
    from flows.acquisition_chat import NoChatStage1, find_chat_stage1
    from policies.lm.mode_mixture import SPEC_FILE

    settings = Settings(home=tmp_path)
    with pytest.raises(NoChatStage1, match="no chat@production released yet"):
        find_chat_stage1(settings)
    assert acquisition.nothing_to_score_with(settings) == (
        "no appendix-d@production released yet, and no chat@production released yet; chat tasks are scored after "
        "the first chat release")
    _release_chat_policy(settings, [], run_id="expert-only")  # a snapshot without proxy pairs trains no stage 1
    with pytest.raises(NoChatStage1, match="run expert-only behind chat@1 trained no stage 1"):
        find_chat_stage1(settings)
    bottleneck = tmp_path / "bottleneck-stage1"
    bottleneck.mkdir()
    _release_chat_policy(settings, [str(bottleneck)], run_id="bottleneck")
    with pytest.raises(NoChatStage1, match=r"stage 1 of run bottleneck behind chat@2 \(.*\) holds no mode mixture"):
        find_chat_stage1(settings)
    (bottleneck / SPEC_FILE).write_text("{}")  # what makes a directory a mixture checkpoint
    found = find_chat_stage1(settings)
    assert (found.checkpoint, found.model_version, found.run_id) == (str(bottleneck), "chat@2", "bottleneck")
    assert acquisition.nothing_to_score_with(settings) is None


def test_open_tasks_are_told_apart_by_their_data() -> None:
    from flows.acquisition_chat import open_text_pair

    pair = open_text_pair({"prompt": "Q?", "answer_a": "yes", "answer_b": "no"})
    assert pair is not None and (pair.prompt, pair.response_a, pair.response_b) == ("Q?", "yes", "no")
    feature = {"prompt": "Input 3", "answer_a": "output 0", "answer_b": "output 2", "x": [0.1], "y_a": 0, "y_b": 2}
    for data in (feature, {"prompt": "", "answer_a": "a", "answer_b": "b"}, {"prompt": "Q?", "answer_a": "a"},
                 {"text": "free text"}, None):
        assert open_text_pair(data) is None


CHAT_PROXY = [PairwiseText(prompt=f"{q} ({i})", response_a=good, response_b=bad, choice="a")
              for i in range(4) for q, good, bad in (
                  ("What is 3 plus 4?", "It is 7.", "It is 9, the model says."),
                  ("Name a colour.", "Blue.", "A colour is a thing that colours."),
                  ("What is 5 plus 1?", "It is 6.", "It is 2."))]


@pytest.fixture(scope="module")
def chat_stage1(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Stage-1 checkpoints of a 3-mode mixture over a tiny base, written by the worker's own mixture run. The
    recipe's 20 epochs let τ̃ route the prompts (w ≈ 0.99 on one mode): relabellings then answer differently."""
    from ground.schemas import LMTrainingRequest
    from tests.workers.lm_helpers import tiny_model_dir
    from workers.lm.mixture_run import train_mixture
    from workers.lm.plans import MixtureRecipe, recipe_request
    from workers.lm.snapshot_data import preference_row, write_jsonl

    root = tmp_path_factory.mktemp("chat-stage1")
    data = write_jsonl([preference_row(p, "proxy") for p in CHAT_PROXY], root / "proxy.jsonl")
    request: LMTrainingRequest = recipe_request(
        "stage1", MixtureRecipe(simplex_dim=3, batch_size=4), run_id="chat-stage1",
        base_model=str(tiny_model_dir()), dataset=str(data), output_dir=root / "stage1")
    checkpoints: list[str] = train_mixture(request, progress=lambda _: None, worker="test")["checkpoints"]
    return checkpoints


def _annotate(client: Any, task_id: int, selected: str) -> None:
    client.annotations.create(id=task_id, result=[{"from_name": "pw", "to_name": "pw", "type": "pairwise",
                                                   "value": {"selected": selected}}])


@pytest.mark.integration
def test_chat_tasks_get_a_pre_annotation_and_a_score_in_label_studio_beside_feature_tasks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, labelstudio: Any, chat_stage1: list[str]) -> None:
    """A project with chat and feature tasks. With only the chat family released, the refresh scores the open text
    pairs under its stage-1 mixture and the store's expert text pairs, and writes each a pairwise pre-annotation and
    its score into Label Studio (a pair whose responses are identical tells no relabelling apart: score 0); the
    feature task is left unscored. Once the feature policy is released too, one refresh scores both kinds into one
    cache, under one model version, each task keeping one prediction."""
    from ground.schemas import ExpertLabel
    from ingest.labelstudio.provision import PAIRWISE_CONFIG, client_for
    from ingest.store import make_engine
    from ingest.upsert import upsert_events

    settings = Settings(home=tmp_path, labelstudio_url=labelstudio.url, labelstudio_token=labelstudio.token)
    _release_chat_policy(settings, chat_stage1)
    experts = [ExpertLabel(event_id=f"e{i}", annotator_id="expert", item=p.model_copy(update={"choice": "ab"[i % 2]}))
               for i, p in enumerate(CHAT_PROXY[:6])]
    with Session(make_engine(settings.resolved_store_url)) as session:
        upsert_events(session, experts)
        session.commit()
    client = client_for(settings)
    project = client.projects.create(title=f"acquisition chat {tmp_path.name}", label_config=PAIRWISE_CONFIG)
    assert project.id is not None
    tasks: list[dict[str, Any]] = [
        {"prompt": "What is 2 plus 2?", "answer_a": "It is 4.", "answer_b": "It is 5, the model says."},
        {"prompt": "Name a colour.", "answer_a": "Blue.", "answer_b": "Blue."},
        {"prompt": "What is 1 plus 1?", "answer_a": "It is 2.", "answer_b": "It is 3."},
        {"prompt": "Input 0: which output fits it better?", "answer_a": "output 0", "answer_b": "output 1",
         "x": [0.5, -0.2], "y_a": 0, "y_b": 1}]
    client.projects.import_tasks(id=project.id, request=tasks)  # type: ignore[arg-type]
    listed: Any = client.tasks.list(project=project.id)
    ids = {t.data["prompt"]: int(t.id) for t in listed}
    chat, same, labelled, feature = (ids["What is 2 plus 2?"], ids["Name a colour."], ids["What is 1 plus 1?"],
                                     ids["Input 0: which output fits it better?"])
    _annotate(client, labelled, "left")

    monkeypatch.setattr(acquisition, "get_settings", lambda: settings)
    monkeypatch.setattr(acquisition, "get_run_logger", lambda: logging.getLogger("test"))
    monkeypatch.setattr(acquisition, "requested_at", lambda: datetime.now(UTC))
    monkeypatch.setattr(acquisition, "publish_acquisition_queue", lambda cache, last: None)
    monkeypatch.setattr(acquisition, "score_open_tasks", acquisition.score_open_tasks.fn)
    monkeypatch.setattr(acquisition, "push_to_labelstudio", acquisition.push_to_labelstudio.fn)

    def predictions() -> dict[int, Any]:
        held: dict[int, list[Any]] = {}
        for p in client.predictions.list(project=project.id):
            held.setdefault(int(p.task), []).append(p)
        assert all(len(each) == 1 for each in held.values()), held  # one prediction of ours per task
        return {task: each[0] for task, each in held.items()}

    first = acquisition.refresh_acquisition_flow.fn(min_interval_s=0, project_id=project.id)
    assert first["status"] == "refreshed" and first["open_tasks"] == 2
    assert (first["method"], first["n_labels"], first["model_version"]) == ("relabelling_posterior", 6, "chat@1")
    cache = read_cache(settings)
    assert cache is not None and set(cache.tasks) == {chat, same}
    held = predictions()
    for task in (chat, same):
        [result] = held[task].result
        assert (result["from_name"], result["to_name"], result["type"]) == ("pw", "pw", "pairwise")
        assert result["value"] == {"selected": "left" if cache.tasks[task].preferred == "a" else "right"}
        assert held[task].score == pytest.approx(cache.tasks[task].score) and held[task].model_version == "chat@1"
    assert held[chat].score > 1e-3 and held[same].score < 1e-9  # identical responses: no mode tells them apart
    assert held[labelled].score == 0.0 and held[labelled].result == []
    assert held[feature].score == pytest.approx(MAX_SCORE) and held[feature].result == []  # not scored: asked early
    assert client.projects.get(project.id).model_version == "chat@1"

    # The feature policy released too: each kind its own scorer, one cache, one version for the project.
    monkeypatch.setattr(acquisition, "production_released", lambda s: True)
    monkeypatch.setattr(acquisition, "score_feature_tasks", lambda s, ids, data, seed: ScoreCache.from_scores(
        ids, text_scores([-2.0] * len(ids), n_labels=3), "appendix-d@1"))
    second = acquisition.refresh_acquisition_flow.fn(min_interval_s=0, project_id=project.id)
    assert second["model_version"] == "appendix-d@1+chat@1" and second["open_tasks"] == 3
    assert second["method"] == "margin+relabelling_posterior" and second["n_labels"] == 9
    cache = read_cache(settings)
    assert cache is not None and set(cache.tasks) == {chat, same, feature}
    held = predictions()
    assert held[feature].result[0]["value"] == {"selected": "right"} and held[feature].score < MAX_SCORE
    for task in (chat, same, feature):
        assert held[task].score == pytest.approx(cache.tasks[task].score)
    assert {p.model_version for p in held.values()} == {"appendix-d@1+chat@1"}
    assert client.projects.get(project.id).model_version == "appendix-d@1+chat@1"


GOOD_FEATURE_TASK = {"x": [0.1] * 5, "y_a": 0, "y_b": 1}
MALFORMED_FEATURE_TASKS = {  # task id -> (data, the reason the log gives)
    11: ({"x": [0.1] * 5, "y_a": 0}, "no y_b"),
    12: ({"x": [0.1] * 4, "y_a": 0, "y_b": 1}, "x has shape (4,), the policy reads 5 numbers"),
    13: ({"x": "0.1,0.2", "y_a": 0, "y_b": 1}, "x is a string"),
    14: ({"x": [0.1] * 5, "y_a": 1, "y_b": 1}, "y_a and y_b are both 1"),
    15: ({"x": [0.1] * 5, "y_a": 0, "y_b": 7}, "y_b 7 is outside the policy's outputs 0..2"),
    16: ({"x": [0.1] * 5, "y_a": "a", "y_b": 1}, "y_a 'a' is not an output id"),
}


@pytest.fixture
def feature_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 5-input, 3-output two-stage policy as production, and no expert triples in the store."""
    import torch

    from policies.features.model import TwoStageConfig, TwoStagePolicy

    torch.manual_seed(0)
    model = TwoStagePolicy(TwoStageConfig())
    version = SimpleNamespace(policy="appendix-d", version=3)
    released = SimpleNamespace(model=model, config=model.config, version=version)
    monkeypatch.setattr(acquisition, "load", lambda ref: released)
    monkeypatch.setattr(acquisition, "expert_triples", lambda settings: [])


@pytest.mark.usefixtures("feature_policy")
def test_malformed_feature_tasks_are_logged_by_id_and_reason_and_the_rest_scored(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A hand-imported task missing a field, or naming an output the policy lacks, used to stop the whole refresh."""
    ids = [1, *MALFORMED_FEATURE_TASKS, 2]
    data = [GOOD_FEATURE_TASK, *(d for d, _ in MALFORMED_FEATURE_TASKS.values()), {**GOOD_FEATURE_TASK, "y_b": "2"}]
    with caplog.at_level(logging.WARNING, logger="proxyloop.flows.acquisition"):
        cache = acquisition.score_feature_tasks(Settings(home=tmp_path), ids, data, seed=0)
    assert set(cache.tasks) == {1, 2} and cache.model_version == "appendix-d@3"
    assert "6 open feature tasks are malformed and not scored (the other 2 are)" in caplog.text
    for task_id, (_, reason) in MALFORMED_FEATURE_TASKS.items():
        assert f"feature task {task_id} not scored: {reason}" in caplog.text

    caplog.clear()  # a whole bad batch: bounded lines, the rest counted
    with caplog.at_level(logging.WARNING, logger="proxyloop.flows.acquisition"):
        acquisition.log_malformed({i: "no y_b" for i in range(25)}, scored=0, limit=10)
    assert len(caplog.records) == 12 and "... and 15 more malformed feature tasks" in caplog.text


@pytest.mark.usefixtures("feature_policy")
def test_a_malformed_feature_task_leaves_the_chat_tasks_and_the_other_feature_tasks_scored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.acquisition_chat import ChatStage1

    monkeypatch.setattr(acquisition, "get_settings", lambda: Settings(home=tmp_path))
    monkeypatch.setattr(acquisition, "get_run_logger", lambda: logging.getLogger("test"))
    monkeypatch.setattr(acquisition, "production_released", lambda s: True)
    monkeypatch.setattr(acquisition, "open_tasks", lambda s, pid: acquisition.OpenTasks(
        feature_ids=[1, 2], feature_data=[GOOD_FEATURE_TASK, {"x": [0.1] * 5, "y_a": 0}], text_ids=[3],
        text_pairs=[PairwiseText(prompt="p", response_a="a", response_b="b", choice="a")]))
    monkeypatch.setattr(acquisition, "find_chat_stage1", lambda s: ChatStage1(checkpoint="/c", model_version="chat@2",
                                                                             run_id="r"))
    monkeypatch.setattr(acquisition, "score_chat_tasks", lambda s, stage1, ids, pairs, seed: ScoreCache.from_scores(
        ids, text_scores([0.5] * len(ids)), "chat@2"))
    cache = acquisition.score_open_tasks.fn(None, 0)
    assert set(cache.tasks) == {1, 3} and cache.model_version == "appendix-d@3+chat@2"
