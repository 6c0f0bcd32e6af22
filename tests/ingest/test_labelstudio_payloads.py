"""Label Studio payloads beyond one usable annotation, through the whole app with Kafka stood in for
(ingest/labelstudio/webhook.py, payloads.py): edits that leave no label, bulk creation, deleted tasks and
users, results that disagree. Shapes as Label Studio 1.23.2 sends them (captured from a real server)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from ground.schemas import ExpertLabel
from ingest.labelstudio import webhook_payload
from ingest.labelstudio.payloads import LSAnnotation
from ingest.labelstudio.provision import WEBHOOK_ACTIONS
from ingest.labelstudio.webhook import HANDLED_ACTIONS
from ingest.store import LabelRow, make_engine
from ingest.upsert import upsert_events
from tests.ingest.test_labelstudio_webhook_route import HOOK, TEXT, RecordingProducer, serve

Hook = tuple[TestClient, RecordingProducer]
PAIRWISE = {"from_name": "pw", "to_name": "pw", "type": "pairwise"}
CREATED_AT = datetime(2026, 12, 2, 1, 24, 47, 442493, tzinfo=UTC)


@pytest.fixture
def hook(tmp_path: Path) -> Hook:
    return serve(tmp_path)


def _post(hook: Hook, payload: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """POST to the webhook; assert 200; the answer and what was published."""
    http, producer = hook
    response = http.post("/webhooks/labelstudio", json=payload, headers=HOOK)
    assert response.status_code == 200, response.text
    return response.json(), producer.published()


def _edited(annotation_id: int, updated_at: datetime, **annotation: Any) -> dict[str, Any]:
    payload = webhook_payload(1, annotation_id, TEXT, "left", action="ANNOTATION_UPDATED")
    payload["annotation"].update(created_at=CREATED_AT.isoformat(), updated_at=updated_at.isoformat(), **annotation)
    return payload


# 1. An edit that leaves no label retracts the label it had.

NO_CHOICE = {
    "choice cleared": {"result": []},
    "selected null": {"result": [{**PAIRWISE, "value": {"selected": None}}]},
    "became a skip": {"was_cancelled": True},
    "skip with null result": {"result": None, "was_cancelled": True},
}


@pytest.mark.parametrize("change", NO_CHOICE.values(), ids=NO_CHOICE.keys())
def test_an_edit_that_leaves_no_choice_publishes_the_retraction_stamped_with_its_update(
    hook: Hook, change: dict[str, Any],
) -> None:
    """Was a 422 with nothing published: the old choice stayed live in the store."""
    updated = CREATED_AT + timedelta(seconds=1)
    body, published = _post(hook, _edited(23, updated, **change))
    assert (body["status"], body["event_ids"]) == ("published", ["labelstudio-annotation-23"])
    assert body["reason"].startswith("label retracted: ")
    [event] = published
    assert (event["event_id"], event["action"], event["item"]) == ("labelstudio-annotation-23", "deleted", None)
    assert datetime.fromisoformat(event["occurred_at"]) == updated


def _stored(home: Path, events: list[ExpertLabel]) -> LabelRow:
    """The row a fresh store keeps after upserting `events` one by one, in that order."""
    home.mkdir()
    engine = make_engine(f"sqlite:///{home / 'store.db'}")
    for event in events:
        with Session(engine) as session:
            upsert_events(session, [event])
            session.commit()
    with Session(engine) as session:
        row = session.get(LabelRow, events[0].event_id)
        assert row is not None
        return row


def test_the_retraction_withdraws_the_older_label_and_a_later_edit_restores_it(hook: Hook, tmp_path: Path) -> None:
    """Stamped with the annotation's updated_at: it outranks the label it withdraws and loses to a later edit
    that restores a choice, whichever order they reach the store in."""
    created = webhook_payload(1, 23, TEXT, "left")
    created["annotation"]["updated_at"] = CREATED_AT.isoformat()
    _post(hook, created)
    _post(hook, _edited(23, CREATED_AT + timedelta(seconds=5), result=[]))
    _, published = _post(hook, _edited(23, CREATED_AT + timedelta(seconds=9)))  # the choice made again
    label, retracted, restored = (ExpertLabel.model_validate(e) for e in published)
    assert _stored(tmp_path / "1", [label, retracted]).deleted
    assert _stored(tmp_path / "2", [retracted, label]).deleted
    for home, order in (("3", [label, retracted, restored]), ("4", [restored, retracted, label])):
        row = _stored(tmp_path / home, order)
        assert not row.deleted and row.item["choice"] == "a"


def test_a_new_annotation_with_a_null_result_is_ignored_not_refused(hook: Hook) -> None:
    """Label Studio stores Annotation.result as nullable; a skip created through its API has none."""
    payload = webhook_payload(5, 5, TEXT, "left")
    payload["annotation"].update(result=None, was_cancelled=True)
    body, published = _post(hook, payload)
    assert (body["status"], published) == ("ignored", [])
    assert body["reason"] == "no label: annotation 5 was skipped by the annotator; it carries no label"


def test_a_null_result_reads_as_no_result() -> None:
    annotation = LSAnnotation.model_validate({"id": 5, "result": None, "was_cancelled": True, "completed_by": 1})
    assert annotation.result == []


# 3. Bulk creation (ANNOTATIONS_CREATED), as Label Studio 1.23.2 sent it for "create annotations from predictions".


def _bulk(annotations: list[dict[str, Any]], tasks: list[dict[str, Any]]) -> dict[str, Any]:
    return {"action": "ANNOTATIONS_CREATED", "annotation": annotations, "task": tasks,
            "project": {"id": 1, "title": "proxyloop pairwise"}}


def _bulk_annotation(annotation_id: int, task_id: int, selected: str | None) -> dict[str, Any]:
    return {"id": annotation_id, "result": [{**PAIRWISE, "value": {"selected": selected}}], "was_cancelled": False,
            "ground_truth": False, "created_at": "2026-12-02T01:24:49.086677Z",
            "updated_at": "2026-12-02T01:24:49.086693Z", "lead_time": None, "result_count": 0,
            "bulk_created": False, "task": task_id, "project": 1, "completed_by": 1, "updated_by": None,
            "parent_prediction": annotation_id - 2, "parent_annotation": None}


def _task(task_id: int, answer_a: str, answer_b: str) -> dict[str, Any]:
    return {"id": task_id, "data": {"prompt": f"q{task_id}", "answer_a": answer_a, "answer_b": answer_b},
            "meta": {}, "is_labeled": False, "overlap": 1, "project": 1, "total_annotations": 0}


def test_bulk_created_annotations_are_published_each_with_its_own_task(hook: Hook) -> None:
    """Was a 422 (action not handled): every label created in bulk waited for reconciliation."""
    tasks = [_task(4, "four-a", "four-b"), _task(3, "three-a", "three-b")]  # not in the annotations' order
    body, published = _post(hook, _bulk([_bulk_annotation(3, 3, "right"), _bulk_annotation(4, 4, "left")], tasks))
    assert (body["status"], body["event_ids"], body["reason"]) == (
        "published", ["labelstudio-annotation-3", "labelstudio-annotation-4"], None)
    assert [(e["action"], e["item"]["prompt"], e["item"]["choice"]) for e in published] == [
        ("created", "q3", "b"), ("created", "q4", "a")]


def test_a_bulk_annotation_that_cannot_be_a_label_leaves_the_others_published(hook: Hook) -> None:
    annotations = [_bulk_annotation(3, 3, None), _bulk_annotation(4, 4, "left"), _bulk_annotation(5, 9, "left")]
    body, published = _post(hook, _bulk(annotations, [_task(3, "a", "b"), _task(4, "a", "b")]))
    assert [e["event_id"] for e in published] == ["labelstudio-annotation-4"]
    assert body["reason"] == ("annotation 3: no label: pairwise result has selected=None; expected 'left' or 'right'; "
                              "annotation 5: refused: its task 9 is not among the payload's [3, 4]")


def test_a_malformed_bulk_annotation_leaves_the_others_published(hook: Hook) -> None:
    """The list was validated whole: one result without from_name made the payload a 422 and lost the good label."""
    broken = _bulk_annotation(6, 3, "left")
    del broken["result"][0]["from_name"]
    body, published = _post(hook, _bulk([broken, _bulk_annotation(4, 4, "left")], [_task(3, "a", "b"),
                                                                                   _task(4, "a", "b")]))
    assert [e["event_id"] for e in published] == ["labelstudio-annotation-4"]
    assert body["reason"].startswith("annotation 6: refused: ") and "from_name" in body["reason"]


def test_the_webhook_subscribes_to_bulk_creation_and_task_deletion_and_handles_every_subscribed_action() -> None:
    assert {"ANNOTATIONS_CREATED", "TASKS_DELETED"} <= set(WEBHOOK_ACTIONS)
    assert set(WEBHOOK_ACTIONS) <= set(HANDLED_ACTIONS)


# 4. Deleted tasks: their annotations go with them, and Label Studio sends no ANNOTATIONS_DELETED.


def test_tasks_deleted_is_acknowledged_and_left_to_reconciliation_with_a_log_line(
    hook: Hook, caplog: pytest.LogCaptureFixture,
) -> None:
    """Was a 422. The payload names only the tasks; the scheduled reconciliation retracts their labels."""
    with caplog.at_level(logging.INFO, logger="proxyloop.labelstudio"):
        body, published = _post(hook, {"action": "TASKS_DELETED", "tasks": [{"id": 3}], "project": {"id": 1}})
    assert (body["status"], published) == ("deferred", [])
    assert body["reason"].startswith("tasks [3] were deleted, and their annotations with them; ")
    assert "next scheduled reconciliation (`proxyloop labelstudio reconcile`) retracts them" in body["reason"]
    assert [r.levelname for r in caplog.records if "TASKS_DELETED" in r.getMessage()] == ["WARNING"]


# 6. A deleted user: Label Studio sets the annotation's completed_by to null.


@pytest.mark.parametrize("completed_by", [None, "missing", {"id": None, "email": "gone@example.com"}],
                         ids=["null", "missing", "object-without-id"])
def test_an_annotation_of_a_deleted_user_is_from_the_unknown_annotator(hook: Hook, completed_by: object) -> None:
    """Was stored as annotator "labelstudio-user-None"."""
    payload = webhook_payload(1, 28, TEXT, "left")
    if completed_by == "missing":
        del payload["annotation"]["completed_by"]
    else:
        payload["annotation"]["completed_by"] = completed_by
    _, [label] = _post(hook, payload)
    assert label["annotator_id"] == "labelstudio-user-unknown"


def test_a_deletion_naming_no_user_is_from_the_unknown_annotator(hook: Hook) -> None:
    _, [event] = _post(hook, {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 28}], "project": {"id": 1}})
    assert (event["action"], event["annotator_id"]) == ("deleted", "labelstudio-user-unknown")


# 7. Several pairwise results: they must agree.


def _two_results(first: str, second: str, action: str = "ANNOTATION_CREATED") -> dict[str, Any]:
    payload = webhook_payload(1, 26, TEXT, "left", action=action)
    payload["annotation"]["result"] = [{**PAIRWISE, "value": {"selected": s}} for s in (first, second)]
    return payload


def test_pairwise_results_that_disagree_carry_no_label(hook: Hook) -> None:
    """The first result used to win silently: a choice the annotator also contradicted was stored."""
    body, published = _post(hook, _two_results("left", "right"))
    assert (body["status"], published) == ("ignored", [])
    assert "annotation 26 has pairwise results that disagree (['left', 'right'])" in body["reason"]
    body, published = _post(hook, _two_results("right", "left", action="ANNOTATION_UPDATED"))
    assert [(e["event_id"], e["action"]) for e in published] == [("labelstudio-annotation-26", "deleted")]


def test_pairwise_results_that_agree_are_one_label(hook: Hook) -> None:
    _, [label] = _post(hook, _two_results("right", "right"))
    assert label["item"]["choice"] == "b"
