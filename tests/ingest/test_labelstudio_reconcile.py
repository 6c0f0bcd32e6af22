"""Reconciliation (ingest/labelstudio/reconcile.py) against a stand-in Label Studio client, its events applied to a
SQLite store as the consumer would: annotations it cannot read, edits that leave no label, a deleted project.
The real server's run is in test_labelstudio_server.py (slow); the shapes here are what Label Studio 1.23.2 gave."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from label_studio_sdk.core.api_error import ApiError
from sqlalchemy.orm import Session

from ground.schemas import ExpertLabel, PairwiseText, ProxyPreference
from ground.schemas.events import LABELSTUDIO_SOURCE
from ground.settings import Settings
from ingest.labelstudio.payloads import annotation_id_of, event_id_for
from ingest.labelstudio.provision import LabelStudioSetupError
from ingest.labelstudio.reconcile import ProjectMissing, reconcile, retract_project
from ingest.store import LabelRow, make_engine
from ingest.upsert import upsert_events
from proxyloop.testing import isolated_settings

T0 = datetime(2026, 12, 2, 1, 24, 47, tzinfo=UTC)
TEXT = {"prompt": "q", "answer_a": "A", "answer_b": "B"}
PROJECT = 1


def _annotation(annotation_id: int, selected: str | None = "left", **fields: Any) -> dict[str, Any]:
    """An annotation as the tasks API lists it (fields we do not read trimmed)."""
    result = [] if selected is None else [{"from_name": "pw", "to_name": "pw", "type": "pairwise",
                                           "value": {"selected": selected}}]
    return {"id": annotation_id, "result": result, "was_cancelled": False, "completed_by": 1,
            "created_at": T0.isoformat(), "updated_at": T0.isoformat(), "task": annotation_id, **fields}


@dataclass
class FakeLabelStudio:
    """What reconcile calls: projects.list, tasks.list and annotations.get; 404s where Label Studio has none."""

    tasks_by_project: dict[int, list[list[dict[str, Any]]]] = field(default_factory=dict)  # annotations per task
    elsewhere: set[int] = field(default_factory=set)  # annotation ids of other projects: they still exist

    def __post_init__(self) -> None:
        self.projects = SimpleNamespace(list=self._projects)
        self.tasks = SimpleNamespace(list=self._tasks)
        self.annotations = SimpleNamespace(get=self._annotation)

    def _projects(self, title: str) -> list[Any]:
        return [SimpleNamespace(id=p, title=title) for p in self.tasks_by_project]

    def _tasks(self, project: int, fields: str, page_size: int) -> list[Any]:
        if project not in self.tasks_by_project:
            raise ApiError(status_code=404, body={"detail": "Not found."})
        return [SimpleNamespace(id=n, data=TEXT, annotations=annotations)
                for n, annotations in enumerate(self.tasks_by_project[project], start=1)]

    def _annotation(self, annotation_id: int) -> dict[str, Any]:
        present = {a["id"] for tasks in self.tasks_by_project.values() for task in tasks for a in task}
        if annotation_id not in present | self.elsewhere:
            raise ApiError(status_code=404, body={"detail": "Not found."})
        return {"id": annotation_id}


class _Ack:
    def get(self, timeout: float | None = None) -> None:
        return None


class StoreProducer:
    """Stands in for Kafka and the consumer: what is flushed is upserted into the store."""

    def __init__(self, settings: Settings) -> None:
        self.engine = make_engine(settings.resolved_store_url)
        self.pending: list[ExpertLabel] = []

    def send(self, topic: str, key: bytes, value: bytes) -> _Ack:
        self.pending.append(ExpertLabel.model_validate_json(value))
        return _Ack()

    def flush(self) -> None:
        with Session(self.engine) as session:
            upsert_events(session, self.pending)
            session.commit()
        self.pending = []

    def close(self) -> None:
        pass


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return isolated_settings(tmp_path, webhook_secret="x")


def _seed(settings: Settings, *annotation_ids: int) -> None:
    """Live labels, as the webhook left them before the change the test makes in Label Studio."""
    item = PairwiseText(prompt="q", response_a="A", response_b="B", choice="a")
    with Session(make_engine(settings.resolved_store_url)) as session:
        upsert_events(session, [ExpertLabel(event_id=f"labelstudio-annotation-{i}", annotator_id="labelstudio-user-1",
                                            item=item, occurred_at=T0) for i in annotation_ids])
        session.commit()


def _live(settings: Settings) -> dict[str, str]:
    with Session(make_engine(settings.resolved_store_url)) as session:
        return {row.event_id: row.item["choice"] for row in session.query(LabelRow) if not row.deleted}


def test_an_annotation_with_a_null_result_or_an_unreadable_one_does_not_stop_the_run(
    settings: Settings, caplog: pytest.LogCaptureFixture,
) -> None:
    """Label Studio's Annotation.result is nullable (a skip created through its API): the validation used to run
    outside the try, so one such annotation raised out of every reconciliation."""
    client = FakeLabelStudio({PROJECT: [[_annotation(5, result=None, was_cancelled=True)], [_annotation(6, "right")],
                                        [{"id": "seven", "result": []}]]})
    with caplog.at_level(logging.WARNING, logger="proxyloop.labelstudio"):
        report = reconcile(settings, client=client,  # type: ignore[arg-type]
                           producer=StoreProducer(settings), project_id=PROJECT)
    assert _live(settings) == {"labelstudio-annotation-6": "b"}
    assert (report.seen, report.published) == (2, 1)
    [skipped] = report.skipped
    assert skipped.startswith("annotation 'seven': unreadable: 1 validation error for LSAnnotation")
    assert f"project {PROJECT}: skipped annotation 'seven': unreadable" in caplog.text


@pytest.mark.parametrize("change", [{"result": []}, {"was_cancelled": True}, {"result": None, "was_cancelled": True}],
                         ids=["choice-cleared", "became-a-skip", "skip-null-result"])
def test_an_annotation_edited_into_no_label_is_retracted_not_skipped(
    settings: Settings, change: dict[str, Any],
) -> None:
    """Was listed as skipped while its old choice stayed live in the store."""
    _seed(settings, 1)
    edited = _annotation(1, **{"updated_at": (T0 + timedelta(seconds=30)).isoformat(), **change})
    report = reconcile(settings, client=FakeLabelStudio({PROJECT: [[edited]]}),  # type: ignore[arg-type]
                       producer=StoreProducer(settings), project_id=PROJECT)
    assert (report.retracted, report.skipped, _live(settings)) == (1, [], {})
    assert report.watermark == T0 + timedelta(seconds=30)


def test_a_missing_project_is_named_and_nothing_is_retracted(settings: Settings) -> None:
    """A deleted project and a URL now pointing at another server (annotation ids start again there) look alike:
    a sweep would retract every label with retractions stamped now, which outrank them for good. Refused instead,
    by id or by title, with every label left live."""
    _seed(settings, 1, 2, 9)
    with pytest.raises(ProjectMissing, match=f"404 for project {PROJECT}: deleted, or PROXYLOOP_LABELSTUDIO_URL"):
        reconcile(settings, client=FakeLabelStudio({}, elsewhere={9}),  # type: ignore[arg-type]
                  producer=StoreProducer(settings), project_id=PROJECT)
    with pytest.raises(LabelStudioSetupError, match="no Label Studio project titled"):
        reconcile(settings, client=FakeLabelStudio({}, elsewhere={9}),  # type: ignore[arg-type]
                  producer=StoreProducer(settings))
    assert set(_live(settings)) == {f"labelstudio-annotation-{i}" for i in (1, 2, 9)}


MALFORMED = ("labelstudio-annotation-x7", "labelstudio-annotation-1_0", "labelstudio-annotation-07",
             "labelstudio-annotation-")


def test_a_stored_event_id_with_the_prefix_but_no_annotation_id_is_left_out_and_named(
    settings: Settings, caplog: pytest.LogCaptureFixture,
) -> None:
    """Any client may send an event id with Label Studio's prefix: int() of the rest raised ValueError out of every
    project's reconciliation (and read "1_0" as annotation 10). Such labels are left alone, each named in the log;
    the well-formed ones are swept as before, by reconcile and by retract_project."""
    item = PairwiseText(prompt="q", response_a="A", response_b="B", choice="a")
    project = f"labelstudio/project-{PROJECT}"
    with Session(make_engine(settings.resolved_store_url)) as session:
        upsert_events(session, [
            *(ExpertLabel(event_id=f"labelstudio-annotation-{i}", annotator_id="labelstudio-user-1", item=item,
                          occurred_at=T0, source=project) for i in (1, 2)),
            ExpertLabel(event_id="labelstudio-annotation-3", annotator_id="labelstudio-user-1", item=item,
                        occurred_at=T0),  # recording no project
            *(ExpertLabel(event_id=event_id, annotator_id="kafka-client", item=item, occurred_at=T0, source=source)
              for event_id, source in zip(MALFORMED, (project, LABELSTUDIO_SOURCE) * 2, strict=True)),
            ProxyPreference(event_id="labelstudio-annotation-judge", proxy_name="judge", item=item, occurred_at=T0),
        ])
        session.commit()
    client = FakeLabelStudio({PROJECT: [[_annotation(1)]]})  # annotation 2 deleted in Label Studio, 3 elsewhere
    with caplog.at_level(logging.WARNING, logger="proxyloop.labelstudio"):
        report = reconcile(settings, client=client,  # type: ignore[arg-type]
                           producer=StoreProducer(settings), project_id=PROJECT)
    assert (report.published, report.retracted, report.unknown_project) == (1, 1, 1)
    left_alone = {*MALFORMED, "labelstudio-annotation-judge"}
    assert set(_live(settings)) == {"labelstudio-annotation-1", "labelstudio-annotation-3"} | left_alone
    for event_id in MALFORMED:  # the proxy preference is not an expert label: the sweep never reads it
        assert f"live label {event_id!r}" in caplog.text and "names no annotation" in caplog.text

    gone = retract_project(settings, PROJECT + 1, client=client,  # type: ignore[arg-type]
                           producer=StoreProducer(settings))
    assert (gone.live, gone.retracted) == (1, 1)  # annotation 3, which Label Studio answers 404 for
    assert set(_live(settings)) == {"labelstudio-annotation-1"} | left_alone


def test_a_proxy_preference_under_a_label_studio_id_is_never_swept(settings: Settings) -> None:
    """A proxy client may send "labelstudio-annotation-5": the sweep reads expert labels only, so it is neither looked
    up as an annotation with no project nor retracted when Label Studio has no annotation 5."""
    item = PairwiseText(prompt="q", response_a="A", response_b="B", choice="a")
    with Session(make_engine(settings.resolved_store_url)) as session:
        upsert_events(session, [
            ExpertLabel(event_id="labelstudio-annotation-1", annotator_id="labelstudio-user-1", item=item,
                        occurred_at=T0, source=f"labelstudio/project-{PROJECT}"),
            ProxyPreference(event_id="labelstudio-annotation-5", proxy_name="judge", item=item, occurred_at=T0),
        ])
        session.commit()
    client = FakeLabelStudio({PROJECT: [[_annotation(1)]]})
    report = reconcile(settings, client=client,  # type: ignore[arg-type]
                       producer=StoreProducer(settings), project_id=PROJECT)
    assert (report.retracted, report.unknown_project) == (0, 0)
    gone = retract_project(settings, PROJECT + 1, client=client,  # type: ignore[arg-type]
                           producer=StoreProducer(settings))
    assert (gone.live, gone.retracted) == (0, 0)
    assert set(_live(settings)) == {"labelstudio-annotation-1", "labelstudio-annotation-5"}


@pytest.mark.parametrize("event_id", [*MALFORMED, "labelstudio-annotation-\u0663", "labelstudio-annotation- 7",
                                      "LABELSTUDIO-ANNOTATION-7", "labelstudio-annotation-+7", "proxy-7"])
def test_only_event_ids_that_event_id_for_makes_name_an_annotation(event_id: str) -> None:
    """SQLite's LIKE, which selects the live labels by prefix, ignores case: "LABELSTUDIO-ANNOTATION-7" reaches it."""
    assert annotation_id_of(event_id) is None
    assert [annotation_id_of(event_id_for(i)) for i in (0, 7, 10**12)] == [0, 7, 10**12]
