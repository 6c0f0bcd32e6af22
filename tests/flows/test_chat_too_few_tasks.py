"""A chat snapshot with too few distinct expert tasks is a refused run that says why, in tasks, once. Before: 40
annotators labelling one calibration pair made a failed run ("has 40 expert text pairs; at least 2 are needed"),
its deterministic error read three times by the task's retries."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from flows import chat
from ground.schemas import ExpertLabel, PairwiseText, ProxyPreference
from ground.settings import Settings, get_settings
from ingest.store import RetrainRun, make_engine
from ingest.upsert import upsert_events
from proxyloop import stack, testing

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    settings = testing.isolated_settings(tmp_path / "home")
    settings.ensure_home()
    for key, value in stack.child_env(settings).items():  # the flow resolves get_settings()
        if key.startswith("PROXYLOOP_"):
            monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    return settings


def test_one_pair_labelled_by_forty_annotators_is_a_refusal_naming_the_distinct_tasks(
    settings: Settings, prefect_server: None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flows.retrain import retrain

    pair = PairwiseText(prompt="Name a colour.", response_a="Blue.", response_b="Seven.", choice="a")
    proxy = [PairwiseText(prompt=f"Name a colour ({i}).", response_a="Red.", response_b="Car.", choice="a")
             for i in range(6)]
    with Session(make_engine(settings.resolved_store_url)) as session:
        upsert_events(session, [ExpertLabel(event_id=f"e{i}", annotator_id=f"a{i}", item=pair) for i in range(40)]
                      + [ProxyPreference(event_id=f"p{i}", proxy_name="judge", item=p) for i, p in enumerate(proxy)])
        session.commit()
    reads: list[str] = []
    real = chat.write_snapshot_datasets

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        reads.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(chat, "write_snapshot_datasets", counted)
    run = retrain()
    assert run.conditions is not None and run.conditions.plan == "refuse"
    assert "40 expert text pairs on 1 distinct tasks" in run.conditions.reasons[0]
    assert len(reads) == 1  # no retry of a snapshot that cannot change
    assert run.training is None and run.gate is None and run.error is None
    with Session(make_engine(settings.resolved_store_url)) as session:
        stored = session.get(RetrainRun, run.run_id)
        assert stored is not None and stored.status == "refused"
