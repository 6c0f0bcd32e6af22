"""Where a Label Studio label came from is recorded with it (labels.source): the webhook names the payload's project,
the demo's made-up payloads are simulated, and the store's upsert never lets a version that names no project erase
one. Reconciliation sweeps only its own project's labels by it (test_labelstudio_project_scope.py, on a real broker).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from ground.schemas import ExpertLabel, PairwiseText, ProxyPreference
from ingest.labelstudio import webhook_payload
from ingest.labelstudio.payloads import project_of_source, retraction
from ingest.labelstudio.webhook import read_webhook
from ingest.store import LabelRow, make_engine
from ingest.upsert import upsert_events

T0 = datetime(2026, 12, 2, 1, 24, 47, tzinfo=UTC)
TEXT = {"prompt": "q", "answer_a": "A", "answer_b": "B"}
ITEM = PairwiseText(prompt="q", response_a="A", response_b="B", choice="a")
KEY = "labelstudio-annotation-5"


def _sources(payload: dict[str, object]) -> list[str]:
    return [label.source for label in read_webhook(payload).labels]


def test_every_webhook_action_records_the_payloads_project() -> None:
    created = webhook_payload(1, 5, TEXT, "left", project_id=3)
    cleared = webhook_payload(1, 5, TEXT, "left", project_id=3, action="ANNOTATION_UPDATED")
    cleared["annotation"]["result"] = []  # an edit that leaves no choice: the label's retraction
    bulk = {"action": "ANNOTATIONS_CREATED", "annotation": [created["annotation"]], "task": [created["task"]],
            "project": {"id": 3}}
    deleted = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 5}], "project": {"id": 3}}
    assert [_sources(p) for p in (created, cleared, bulk, deleted)] == [["labelstudio/project-3"]] * 4
    assert [label.action for label in read_webhook(cleared).labels] == ["deleted"]


def test_a_payload_without_a_project_records_none_and_a_simulated_one_no_real_projects() -> None:
    anonymous = webhook_payload(1, 5, TEXT, "left")
    del anonymous["project"]
    assert _sources(anonymous) == ["labelstudio"]  # the contract's default: no project named
    assert _sources(webhook_payload(1, 5, TEXT, "left", project_id=1, simulated=True)) == ["labelstudio/simulated"]
    assert project_of_source("labelstudio/simulated") is None and project_of_source("labelstudio/project-1") == 1
    assert project_of_source("labelstudio/project-1x") is None and project_of_source(None) is None


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return make_engine(f"sqlite:///{tmp_path}/store.db")


def _apply(engine: Engine, *events: ExpertLabel | ProxyPreference) -> dict[str, LabelRow]:
    with Session(engine, expire_on_commit=False) as session:
        upsert_events(session, events)
        session.commit()
        return {row.event_id: row for row in session.query(LabelRow)}


def _label(source: str = "labelstudio", at: datetime = T0, choice: str = "a") -> ExpertLabel:
    item = ITEM.model_copy(update={"choice": choice})
    return ExpertLabel(event_id=KEY, annotator_id="labelstudio-user-1", item=item, occurred_at=at, source=source)


def test_a_retraction_that_names_no_project_keeps_the_recorded_one(engine: Engine) -> None:
    """ANNOTATIONS_DELETED from a payload without a project, or retract-project's retraction of a label recording
    none: erasing the project would hide the tombstone's label from its project's reconciliation."""
    _apply(engine, _label("labelstudio/project-1"))
    row = _apply(engine, retraction(5, 1, T0 + timedelta(seconds=1)))[KEY]
    assert (row.deleted, row.source) == (True, "labelstudio/project-1")


@pytest.mark.parametrize("in_one_batch", [False, True], ids=["stored", "same-batch"])
def test_a_version_naming_the_project_records_it_on_a_label_that_recorded_none(
    engine: Engine, in_one_batch: bool,
) -> None:
    """A copy (same content, reconciliation re-sending it) or an older version fills it in, changing nothing else;
    a newer version replaces it; one naming none erases nothing."""
    old, copy = _label(), _label("labelstudio/project-2", T0 + timedelta(seconds=5))
    rows = _apply(engine, old, copy) if in_one_batch else (_apply(engine, old), _apply(engine, copy))[1]
    assert (rows[KEY].source, rows[KEY].occurred_at.replace(tzinfo=UTC)) == ("labelstudio/project-2", T0)
    newer = _apply(engine, _label("labelstudio/project-4", T0 + timedelta(seconds=9), "b"))[KEY]
    assert (newer.source, newer.item["choice"]) == ("labelstudio/project-4", "b")
    older = _apply(engine, _label("labelstudio/project-7", T0 - timedelta(seconds=9)))[KEY]
    assert (older.source, older.item["choice"]) == ("labelstudio/project-4", "b")
    unnamed = _apply(engine, _label(at=T0 + timedelta(seconds=20), choice="a"))[KEY]
    assert (unnamed.source, unnamed.item["choice"]) == ("labelstudio/project-4", "a")


def test_proxy_preferences_and_default_sources_record_none_and_a_repeat_writes_nothing(
    engine: Engine,
) -> None:
    proxy = ProxyPreference(event_id="p1", proxy_name="judge", item=ITEM, occurred_at=T0)
    rows = _apply(engine, proxy, _label())
    assert (rows["p1"].source, rows[KEY].source) == (None, None)
    with Session(engine) as session:
        assert upsert_events(session, [_label("labelstudio/project-1")]) == 0  # a copy: no version written
        session.commit()
