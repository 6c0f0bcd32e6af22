"""Label Studio's webhook: the route that receives it, and which events each action asks for.

The route checks the shared secret, reads the payload (the conversion is payloads.py, shared with
reconciliation) and publishes to Kafka, answering only after the broker's ack, so a 200 that names
events means they are durable in the log.

What each action does:
- ANNOTATION_CREATED / ANNOTATIONS_CREATED (bulk, e.g. predictions turned into annotations): a label per
  annotation. One that holds no preference (a skip, no choice) is answered "ignored" with the reason and
  nothing is published: its event id never held a label, so there is nothing to retract, and a skip then
  needs no broker. (Reconciliation, which cannot tell a new annotation from an edited one, retracts; that
  is harmless here.)
- ANNOTATION_UPDATED: the edited label; an edit that leaves no preference (choice cleared, turned into a
  skip, choices that disagree) publishes the label's retraction, so the old choice does not stay live.
- ANNOTATIONS_DELETED: a retraction per annotation.
- TASKS_DELETED: Label Studio deletes the annotations with them and sends no ANNOTATIONS_DELETED, nor their
  ids; the next scheduled reconciliation retracts those labels (it asks Label Studio for the annotation of
  every live label recorded as the project's). PROJECT_DELETED: reconciliation then refuses
  (reconcile.ProjectMissing) and retracts nothing.
  Both answered 200 with the reason, and logged.
- Any other action: 200 "ignored" with the reason, and logged: Label Studio (1.23+) turns off a webhook
  after repeated failures, which would also stop the actions we handle.
Every event records the payload's project as its source (payloads.source_of_webhook), so reconciling one project
leaves another's labels alone; payloads the demo makes up without a Label Studio record a source no project has.
A malformed payload of a handled action, or a task without what the label needs, is a 422 with the reason,
decided before anything is published: a label half-read or guessed at would be stored as the expert's.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyHeader
from kafka import KafkaProducer
from kafka.errors import KafkaError
from pydantic import AliasChoices, BaseModel, Field, ValidationError

from ground.schemas import ExpertLabel
from ground.settings import Settings
from ingest.bus import encode_event, publish
from ingest.labelstudio.payloads import (
    LSAnnotation,
    LSModel,
    LSTask,
    NoLabel,
    UnusableAnnotation,
    expert_label_from_annotation,
    retraction,
    retraction_of,
    source_of_webhook,
)
from ingest.web import ProducerDep, SettingsDep, json_body

log = logging.getLogger("proxyloop.labelstudio")

_ACTIONS: dict[str, Literal["created", "updated"]] = {
    "ANNOTATION_CREATED": "created",
    "ANNOTATION_UPDATED": "updated",
}
BULK_CREATED_ACTION = "ANNOTATIONS_CREATED"
DELETED_ACTION = "ANNOTATIONS_DELETED"
TASKS_DELETED_ACTION = "TASKS_DELETED"
PROJECT_DELETED_ACTION = "PROJECT_DELETED"
SECRET_HEADER = "X-Proxyloop-Secret"

router = APIRouter(tags=["labelstudio"])


class LSWebhook(LSModel):
    """The part of Label Studio's ANNOTATION_CREATED/UPDATED payload that we read."""

    action: str
    annotation: LSAnnotation
    task: LSTask
    project: dict[str, Any] | None = None


class LSBulkWebhook(LSModel):
    """ANNOTATIONS_CREATED: Label Studio 1.23 sends lists under the singular keys `annotation` and `task`."""

    action: Literal["ANNOTATIONS_CREATED"]
    # Read one by one in `_bulk_created`: one malformed annotation must not refuse the usable ones.
    annotations: list[dict[str, Any]] = Field(validation_alias=AliasChoices("annotation", "annotations"))
    tasks: list[LSTask] = Field(validation_alias=AliasChoices("task", "tasks"))
    project: dict[str, Any] | None = None


class LSDeletedRef(LSModel):
    id: int
    completed_by: int | dict[str, Any] | None = None


class LSDeletionWebhook(LSModel):
    """ANNOTATIONS_DELETED: only the ids of the deleted annotations."""

    action: Literal["ANNOTATIONS_DELETED"]
    annotations: list[LSDeletedRef]
    project: dict[str, Any] | None = None


class LSTaskRef(LSModel):
    id: int


class LSTasksDeletedWebhook(LSModel):
    """TASKS_DELETED: only the ids of the deleted tasks, not of their (also deleted) annotations."""

    action: Literal["TASKS_DELETED"]
    tasks: list[LSTaskRef]
    project: dict[str, Any] | None = None


@dataclass(frozen=True)
class WebhookOutcome:
    """What a webhook asks for: the events to publish and why anything else was left out (answered and logged)."""

    labels: list[ExpertLabel] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    deferred: bool = False  # left to the next reconciliation
    level: int = logging.INFO  # of the reasons' log lines

    @property
    def status(self) -> Literal["published", "ignored", "deferred"]:
        return "published" if self.labels else "deferred" if self.deferred else "ignored"


_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def _action_of(payload: object) -> str:
    """The payload's action; a body that is no Label Studio webhook at all is refused."""
    if not isinstance(payload, dict):
        kind = _JSON_KINDS.get(type(payload), type(payload).__name__)
        raise UnusableAnnotation(f"payload is a JSON {kind}, not an object with an 'action'")
    action = payload.get("action")
    if not isinstance(action, str):
        raise UnusableAnnotation(f"payload has no Label Studio 'action' (found {action!r})")
    return action


def _handled_action(payload: object, handled: tuple[str, ...]) -> str:
    """The payload's action, checked before its shape: another action's payload has other fields, and
    "not handled" says more than the validation errors its shape would give."""
    action = _action_of(payload)
    if action not in handled:
        raise UnusableAnnotation(f"action {action!r} is not handled; expected one of {sorted(handled)}")
    return action


def expert_label_from_webhook(payload: dict[str, Any]) -> ExpertLabel:
    """ANNOTATION_CREATED/UPDATED → one event. Raises UnusableAnnotation or pydantic.ValidationError."""
    action = _ACTIONS[_handled_action(payload, tuple(_ACTIONS))]
    hook = LSWebhook.model_validate(payload)
    return expert_label_from_annotation(hook.annotation, hook.task, action, source_of_webhook(payload))


def _one_annotation(payload: dict[str, Any]) -> WebhookOutcome:
    """ANNOTATION_CREATED/UPDATED. An edit that leaves no preference retracts the label; a new one is ignored."""
    hook = LSWebhook.model_validate(payload)
    action, source = _ACTIONS[hook.action], source_of_webhook(payload)
    try:
        return WebhookOutcome([expert_label_from_annotation(hook.annotation, hook.task, action, source)])
    except NoLabel as exc:
        if action == "updated":
            return WebhookOutcome([retraction_of(hook.annotation, source)], [f"label retracted: {exc}"])
        return WebhookOutcome(reasons=[f"no label: {exc}"])


def _bulk_created(payload: dict[str, Any]) -> WebhookOutcome:
    """ANNOTATIONS_CREATED: each annotation with its task (by the annotation's `task`). One that cannot be a
    label is left out with its reason rather than refusing the lot: a 422 would lose the usable ones too."""
    hook = LSBulkWebhook.model_validate(payload)
    tasks = {task.id: task for task in hook.tasks}
    source = source_of_webhook(payload)
    labels: list[ExpertLabel] = []
    reasons: list[str] = []
    refused = False
    for raw in hook.annotations:
        try:
            annotation = LSAnnotation.model_validate(raw)
        except ValidationError as exc:
            refused = True
            reasons.append(f"annotation {raw.get('id')!r}: refused: {exc}")
            continue
        task = tasks.get(annotation.task) if annotation.task is not None else None
        try:
            if task is None:
                raise UnusableAnnotation(f"its task {annotation.task!r} is not among the payload's {sorted(tasks)}")
            labels.append(expert_label_from_annotation(annotation, task, "created", source))
        except NoLabel as exc:
            reasons.append(f"annotation {annotation.id}: no label: {exc}")
        except (UnusableAnnotation, ValidationError) as exc:
            refused = True
            reasons.append(f"annotation {annotation.id}: refused: {exc}")
    return WebhookOutcome(labels, reasons, level=logging.WARNING if refused else logging.INFO)


def _deleted(payload: dict[str, Any]) -> WebhookOutcome:
    hook = LSDeletionWebhook.model_validate(payload)
    source = source_of_webhook(payload)
    return WebhookOutcome([retraction(ref.id, ref.completed_by, source=source) for ref in hook.annotations])


def _tasks_deleted(payload: dict[str, Any]) -> WebhookOutcome:
    """TASKS_DELETED/PROJECT_DELETED: nothing names the annotations that went with them. A deleted task's are found
    by the next scheduled reconciliation (the reconcile-labelstudio deployment has no event trigger,
    flows/deployments.py; PROXYLOOP_LABELSTUDIO_RECONCILE_INTERVAL_S); a deleted project's are not (ProjectMissing)."""
    if payload.get("action") != TASKS_DELETED_ACTION:
        return WebhookOutcome(deferred=True, level=logging.WARNING, reasons=[
            "the project was deleted, and its annotations with it; their labels stay live: reconciliation cannot "
            "tell a deleted project from a URL pointing at another server, so it retracts nothing for it; an "
            "operator retracts them with `proxyloop labelstudio retract-project --project ID`"])
    ids = [task.id for task in LSTasksDeletedWebhook.model_validate(payload).tasks]
    return WebhookOutcome(deferred=True, level=logging.WARNING, reasons=[
        f"tasks {ids} were deleted, and their annotations with them; Label Studio names none of those annotations, "
        "so their labels stay live until the next scheduled reconciliation (`proxyloop labelstudio reconcile`) "
        "retracts them"])


_HANDLERS: dict[str, Callable[[dict[str, Any]], WebhookOutcome]] = {
    **dict.fromkeys(_ACTIONS, _one_annotation), BULK_CREATED_ACTION: _bulk_created, DELETED_ACTION: _deleted,
    TASKS_DELETED_ACTION: _tasks_deleted, PROJECT_DELETED_ACTION: _tasks_deleted,
}
HANDLED_ACTIONS = tuple(_HANDLERS)


def read_webhook(payload: object) -> WebhookOutcome:
    """Any webhook → what to publish and why the rest was left out. Raises UnusableAnnotation or
    pydantic.ValidationError for a body that is no webhook or a handled action's malformed payload."""
    action = _action_of(payload)
    assert isinstance(payload, dict)  # _action_of refused anything else
    handler = _HANDLERS.get(action)
    if handler is None:
        return WebhookOutcome(reasons=[f"action {action!r} is not handled; handled: {sorted(HANDLED_ACTIONS)}"])
    return handler(payload)


def expert_labels_from_webhook(payload: dict[str, Any]) -> list[ExpertLabel]:
    """Any webhook → its events (ANNOTATIONS_DELETED and ANNOTATIONS_CREATED name several annotations)."""
    return read_webhook(payload).labels


# The route: secret check, conversion above, publish; 200 only once Kafka acknowledged every label.


class WebhookAccepted(BaseModel):
    status: Literal["published", "ignored", "deferred"] = "published"
    event_id: str
    event_ids: list[str]
    topic: str
    reason: str | None = Field(None, description="Why something was not published (or a label was retracted).")


# auto_error=False: a missing header gets the same 401 and message as a wrong one.
_secret_header = APIKeyHeader(name=SECRET_HEADER, auto_error=False, description="The shared webhook secret.")


def secret_matches(presented: str | None, settings: Settings) -> bool:
    """The shared webhook secret, compared in constant time; None or empty (nothing presented) never matches, even
    an empty secret (an empty header or Basic password had opened the ML backend)."""
    return bool(presented) and bool(settings.webhook_secret) and hmac.compare_digest(
        (presented or "").encode(), settings.webhook_secret.encode())


def require_webhook_secret(settings: SettingsDep, secret: Annotated[str | None, Depends(_secret_header)]) -> None:
    if not secret_matches(secret, settings):
        raise HTTPException(401, f"missing or wrong {SECRET_HEADER} header")


def broker_unavailable(reason: str) -> HTTPException:
    """503: no broker took the label, so nothing is acknowledged; Label Studio's resend or the next reconciliation
    (reconcile.py) delivers it once the broker is back. `reason` names PROXYLOOP_KAFKA_BOOTSTRAP."""
    return HTTPException(503, f"label not accepted: {reason}", headers={"Retry-After": "10"})


AMPLIFICATION = 8  # the events of one request may be this many times its size limit: a bulk payload's labels each
# carry their task's text, so one long task with thousands of tiny annotations pointing at it made 1 MiB 2 GB


def _refuse_amplified(labels: list[ExpertLabel], settings: Settings) -> None:
    """A 413, before anything is published, when one request's events would be more than `AMPLIFICATION` times the
    request size limit."""
    limit = AMPLIFICATION * settings.max_request_bytes
    total = 0
    for label in labels:
        total += len(encode_event(label))
        if total > limit:
            raise HTTPException(413, f"this request's {len(labels)} labels would publish more than {limit} bytes of "
                                     f"events ({AMPLIFICATION} x PROXYLOOP_MAX_REQUEST_BYTES); nothing was published: "
                                     "send fewer annotations per request")


def _publish_all(producer: KafkaProducer, topic: str, labels: list[ExpertLabel]) -> None:
    futures = [publish(producer, topic, label, wait=False) for label in labels]
    producer.flush()
    for future in futures:
        future.get(timeout=30)


def _log_outcome(action: object, outcome: WebhookOutcome) -> None:
    """Whatever was not published as a label is logged: the answer's reason reaches only Label Studio's side."""
    for reason in outcome.reasons:
        log.log(outcome.level, "Label Studio webhook %s: %s", action, reason)


@router.post("/webhooks/labelstudio", response_model=WebhookAccepted, dependencies=[Depends(require_webhook_secret)])
async def receive_labelstudio_webhook(
    request: Request, settings: SettingsDep, producer: ProducerDep
) -> WebhookAccepted:
    """Receive a Label Studio webhook (what each action does: this module's docstring); 200 only once Kafka has
    every event it names. A body that is not a webhook, a handled action's malformed payload, or a task without
    what the label needs is a 422 with the reason, decided before anything is published."""
    payload = await json_body(request, "unusable Label Studio payload: body")
    try:
        outcome = read_webhook(payload)
    except (ValueError, ValidationError, RecursionError) as exc:  # refused before anything is published
        raise HTTPException(422, f"unusable Label Studio payload: {exc}") from exc
    _log_outcome(payload.get("action"), outcome)
    _refuse_amplified(outcome.labels, settings)
    if outcome.labels:
        try:
            # producer() may connect (up to kafka_bootstrap_timeout_s): in the thread pool, never on the event loop.
            await run_in_threadpool(lambda: _publish_all(producer(), settings.topic_expert, outcome.labels))
        except KafkaError as exc:  # the broker went away after the producer opened: unacknowledged, so no 200
            raise broker_unavailable(f"Kafka at {settings.kafka_bootstrap} (PROXYLOOP_KAFKA_BOOTSTRAP) did not "
                                     f"acknowledge it: {exc}") from exc
    ids = [label.event_id for label in outcome.labels]
    return WebhookAccepted(status=outcome.status, event_id=ids[0] if ids else "", event_ids=ids,
                           topic=settings.topic_expert, reason="; ".join(outcome.reasons) or None)
