"""The `refresh-acquisition` flow on chat tasks (flows/acquisition_chat.py: the chat family's stage 1 and tasks, and
both families' predictions in a real Label Studio), and on malformed feature tasks beside good ones."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy.orm import Session

import flows.acquisition as acquisition
from ground.schemas import PairwiseText
from ground.settings import Settings
from policies.acquisition import MAX_SCORE, text_scores
from policies.ml_backend import ScoreCache, read_cache


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
