"""POST /webhooks/labelstudio through the whole app, Kafka stood in for: what is refused is refused with a
reason and nothing published, since a 200 tells Label Studio the label is durable (ingest/labelstudio/webhook.py).
The conversion alone is tested in test_labelstudio.py; against a real broker in tests/policies/test_serve.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from ingest.labelstudio import SECRET_HEADER, webhook_payload
from ingest.web import app_producer
from proxyloop.http import create_app
from proxyloop.testing import isolated_settings

SECRET = "s3cret-hook"
HOOK = {SECRET_HEADER: SECRET}
TEXT = {"prompt": "Capital of France?", "answer_a": "Lyon", "answer_b": "Paris"}


class _Acknowledged:
    def get(self, timeout: float | None = None) -> None:
        return None


class RecordingProducer:
    """Stands in for the app's Kafka producer: every send is acknowledged at once and kept in `sent`."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []

    def send(self, topic: str, key: bytes, value: bytes) -> _Acknowledged:
        self.sent.append((topic, key, value))
        return _Acknowledged()

    def flush(self) -> None:
        pass

    def published(self) -> list[dict[str, Any]]:
        return [json.loads(value) for _, _, value in self.sent]


def serve(home: Path, **overrides: object) -> tuple[TestClient, RecordingProducer]:
    """The HTTP app (lifespan not run, so no real producer) with the recording producer in its place."""
    app = create_app(isolated_settings(home, webhook_secret=SECRET, **overrides))
    producer = RecordingProducer()
    app.dependency_overrides[app_producer] = lambda: lambda: producer
    return TestClient(app), producer


@pytest.fixture
def hook(tmp_path: Path) -> tuple[TestClient, RecordingProducer]:
    return serve(tmp_path)


def _refused(hook: tuple[TestClient, RecordingProducer], **post: Any) -> str:
    """POST to the webhook; assert 422 and nothing published; the reason."""
    http, producer = hook
    response = http.post("/webhooks/labelstudio", headers={**HOOK, **post.pop("headers", {})}, **post)
    assert response.status_code == 422, response.text
    assert producer.sent == []
    detail: str = response.json()["detail"]
    assert detail.startswith("unusable Label Studio payload: ")
    return detail


def test_the_producer_is_opened_in_the_thread_pool_never_on_the_event_loop(tmp_path: Path) -> None:
    """Opening it may wait kafka_bootstrap_timeout_s for a broker: on the event loop that froze every route (a 3 s
    connect held GET /health for 2.6 s)."""
    import asyncio

    app = create_app(isolated_settings(tmp_path, webhook_secret=SECRET))
    producer, on_loop = RecordingProducer(), []

    def opened() -> RecordingProducer:
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # no loop in this thread: a thread-pool worker
            on_loop.append(False)
        return producer

    app.dependency_overrides[app_producer] = lambda: opened
    response = TestClient(app).post("/webhooks/labelstudio", json=webhook_payload(1, 7, TEXT, "right"), headers=HOOK)
    assert response.status_code == 200 and on_loop == [False] and len(producer.sent) == 1


def test_a_usable_annotation_is_published_then_acknowledged(hook: tuple[TestClient, RecordingProducer]) -> None:
    http, producer = hook
    response = http.post("/webhooks/labelstudio", json=webhook_payload(1, 7, TEXT, "right"), headers=HOOK)
    assert response.status_code == 200 and response.json()["event_ids"] == ["labelstudio-annotation-7"]
    [label] = producer.published()
    assert (label["item"]["response_b"], label["item"]["choice"]) == ("Paris", "b")


@pytest.mark.parametrize("data, reason", [
    # The audit's case: the responses under other keys were stored as two empty strings.
    ({"prompt": "p", "response_a": "A", "response_b": "B"}, "'answer_a' is missing; 'answer_b' is missing."),
    ({"prompt": "only a prompt"}, "'answer_a' is missing; 'answer_b' is missing."),
    ({**TEXT, "answer_b": "  "}, "task 1: 'answer_b' is empty."),
    ({**TEXT, "prompt": ""}, "task 1: 'prompt' is empty."),
    ({**TEXT, "answer_a": None}, "task 1: 'answer_a' is missing."),
    ({**TEXT, "answer_a": 3}, "task 1: 'answer_a' is not a string (int)."),
], ids=["other-keys", "prompt-only", "empty-answer", "empty-prompt", "null-answer", "number-answer"])
def test_a_text_task_without_its_prompt_and_both_answers_is_refused(
    hook: tuple[TestClient, RecordingProducer], data: dict[str, Any], reason: str,
) -> None:
    detail = _refused(hook, json=webhook_payload(1, 16, data, "left"))
    assert reason in detail
    assert "A text task needs non-empty 'prompt', 'answer_a', 'answer_b' (a feature task: 'x', 'y_a', 'y_b')" in detail


@pytest.mark.parametrize("y_a, shown", [(1.7, "1.7"), (True, "True"), ("one", "'one'"), (None, "None"),
                                        (float("inf"), "inf")], ids=["fraction", "bool", "word", "null", "inf"])
def test_a_feature_task_output_id_that_is_not_an_integer_is_refused(
    hook: tuple[TestClient, RecordingProducer], y_a: object, shown: str,
) -> None:
    """1.7 used to be truncated to output 1: a comparison the annotator never saw."""
    payload = webhook_payload(1, 17, {"x": [0.1, 0.2], "y_a": y_a, "y_b": 0}, "left")
    body = json.dumps(payload, allow_nan=True)  # inf travels as Infinity, which Python's json reads back
    detail = _refused(hook, content=body, headers={"content-type": "application/json"})
    assert f"task data 'y_a' is {shown}; a feature task (one with 'x') needs integer output ids 'y_a', 'y_b'" in detail


def test_a_missing_feature_output_id_is_named(hook: tuple[TestClient, RecordingProducer]) -> None:
    detail = _refused(hook, json=webhook_payload(1, 17, {"x": [0.1], "y_a": 1}, "left"))
    assert "task data 'y_b' is missing" in detail


def test_integral_output_ids_are_taken_as_integers(hook: tuple[TestClient, RecordingProducer]) -> None:
    http, producer = hook
    for annotation, (y_a, y_b) in enumerate([(1.0, 0), ("2", 0)], start=20):
        payload = webhook_payload(1, annotation, {"x": [0.1], "y_a": y_a, "y_b": y_b}, "left")
        assert http.post("/webhooks/labelstudio", json=payload, headers=HOOK).status_code == 200
    assert [(p["item"]["y_w"], p["item"]["y_l"]) for p in producer.published()] == [(1, 0), (2, 0)]


@pytest.mark.parametrize("body, reason", [
    (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply to parse"),  # 200 KB: under the size limit
    (b'{"action": "ANNOTATION_CREATED",', "body is not JSON"),
    (b"\xff\xfe", "body is not JSON"),
], ids=["deep", "truncated", "not-utf8"])
def test_a_body_that_does_not_parse_is_refused_not_a_500(
    hook: tuple[TestClient, RecordingProducer], body: bytes, reason: str,
) -> None:
    assert reason in _refused(hook, content=body, headers={"content-type": "application/json"})


@pytest.mark.parametrize("action", ["TASKS_CREATED", "PROJECT_CREATED", "PROJECT_UPDATED", "REVIEW_CREATED",
                                    "REVIEW_UPDATED", "LABEL_LINK_CREATED", "START_TRAINING"])
def test_an_action_not_handled_is_answered_200_ignored_with_the_reason_and_logged(
    hook: tuple[TestClient, RecordingProducer], action: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """Was a 422: Label Studio 1.23+ turns a webhook off after repeated failures, and with it the actions we
    handle. An action of no concern is acknowledged, publishes nothing, and says (and logs) why."""
    http, producer = hook
    with caplog.at_level(logging.INFO, logger="proxyloop.labelstudio"):
        response = http.post("/webhooks/labelstudio", json={"action": action, "project": {"id": 1}}, headers=HOOK)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["status"], body["event_ids"], producer.sent) == ("ignored", [], [])
    assert body["reason"].startswith(f"action {action!r} is not handled; handled: ")
    assert f"Label Studio webhook {action}: action {action!r} is not handled" in caplog.text


def test_a_payload_without_an_action_is_refused(hook: tuple[TestClient, RecordingProducer]) -> None:
    """No action at all is no Label Studio webhook: still a 422, with the handler's own reason."""
    detail = _refused(hook, json={"project": {"id": 1}})
    assert detail == "unusable Label Studio payload: payload has no Label Studio 'action' (found None)"


def test_a_handled_action_with_a_malformed_payload_is_still_refused(hook: tuple[TestClient, RecordingProducer]) -> None:
    """A webhook sent without its payload (send_payload off) cannot be read: 422, not "ignored"."""
    for action in ("ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED", "TASKS_DELETED"):
        assert "validation error" in _refused(hook, json={"action": action})


def test_a_payload_that_is_not_an_object_is_refused(hook: tuple[TestClient, RecordingProducer]) -> None:
    assert "payload is a JSON array, not an object with an 'action'" in _refused(hook, json=[1, 2])
    assert "payload is a JSON null, not an object" in _refused(hook, content=b"null", headers={"content-type": "json"})


def test_a_new_skipped_annotation_is_ignored_not_refused_and_nothing_is_published(
    hook: tuple[TestClient, RecordingProducer],
) -> None:
    """Label Studio's `was_cancelled` is "User skipped the task"; a skip submits what the editor held, a click
    included. A new one never held a label: 200 "ignored" with the reason (it was a 422), nothing published."""
    http, producer = hook
    chosen = webhook_payload(1, 5, TEXT, "left")
    chosen["annotation"]["was_cancelled"] = True
    empty = webhook_payload(1, 5, TEXT, "left")
    empty["annotation"].update(result=[], was_cancelled=True)
    answers = [http.post("/webhooks/labelstudio", json=payload, headers=HOOK) for payload in (chosen, empty)]
    assert [a.status_code for a in answers] == [200, 200] and producer.sent == []
    assert answers[0].json() == answers[1].json()
    assert answers[0].json()["status"] == "ignored"
    assert answers[0].json()["reason"] == "no label: annotation 5 was skipped by the annotator; it carries no label"


def test_a_bulk_payload_whose_labels_would_dwarf_it_is_a_413_and_nothing_is_published(tmp_path: Path) -> None:
    """Each label carries its task's text: one long task with many tiny annotations made 1 MiB 2 GB of events."""
    http, producer = serve(tmp_path, max_request_bytes=20_000)
    long = "x" * 5_000
    task = {"id": 7, "data": {"prompt": long, "answer_a": long + "a", "answer_b": long + "b"}, "project": 1}
    annotations = [{"id": 100 + i, "task": 7, "completed_by": 1, "was_cancelled": False,
                    "created_at": "2026-12-02T01:24:49Z", "updated_at": "2026-12-02T01:24:49Z",
                    "result": [{"from_name": "pw", "to_name": "pw", "type": "pairwise",
                                "value": {"selected": "left"}}]} for i in range(12)]
    body = {"action": "ANNOTATIONS_CREATED", "annotation": annotations, "task": [task], "project": {"id": 1}}
    assert len(json.dumps(body)) < 20_000
    reply = http.post("/webhooks/labelstudio", headers=HOOK, json=body)
    assert reply.status_code == 413 and "send fewer annotations per request" in reply.json()["detail"]
    assert producer.sent == []
    few = http.post("/webhooks/labelstudio", headers=HOOK, json={**body, "annotation": annotations[:2]})
    assert few.status_code == 200 and len(producer.sent) == 2  # within the limit: published as before


@pytest.mark.parametrize("change", [
    lambda p: p["annotation"].update(completed_by={"id": "x" * 300}),
    lambda p: p["annotation"].update(completed_by={"id": "a\u0000b"}),
], ids=["annotator-over-256", "nul-in-annotator"])
def test_what_a_postgresql_store_would_refuse_is_a_422_before_publishing(
    hook: tuple[TestClient, RecordingProducer], change: Any,
) -> None:
    """Acknowledged with 200 before, then refused by PostgreSQL (its text columns hold no NUL, and 256 characters),
    so the label was dead-lettered after Label Studio had been told it was stored; SQLite took it. (A NUL in the
    task's text is stored: the item is JSON, which takes it.)"""
    payload = webhook_payload(1, 16, TEXT, "left")
    change(payload)
    assert "NUL character" in _refused(hook, json=payload) or "256 characters" in _refused(hook, json=payload)


def test_a_payload_edited_by_its_caller_leaves_the_task_data_it_was_made_from_alone() -> None:
    """A test that edited one payload's task wrote into the module-level TEXT every other module builds from, and a
    later module's webhooks failed, in the whole suite only."""
    data = dict(TEXT)
    webhook_payload(1, 16, data, "left")["task"]["data"].update(answer_a="edited")
    assert data == TEXT
