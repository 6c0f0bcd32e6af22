"""Label Studio's webhook: the route that receives it, and annotation JSON → `ExpertLabel` events.

Both live here because they are one step of a label's path: the route checks the shared secret,
converts the payload and publishes to Kafka, answering only after the broker's ack, so a 200 means
the label is durable in the log.

Reconciliation (`reconcile.py`) builds events through the same conversion functions, so one
annotation gets the same event id (`labelstudio-annotation-{id}`) and the same `occurred_at`
whichever path delivered it; the store's idempotent upsert then keeps exactly one row.
"""

from __future__ import annotations

import hmac
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyHeader
from kafka import KafkaProducer
from kafka.errors import KafkaError
from pydantic import BaseModel, ConfigDict, ValidationError

from ground.moments import as_utc, utcnow
from ground.schemas import ExpertLabel, FeatureTriple, Item, PairwiseText
from ground.settings import Settings
from ingest.bus import publish
from ingest.web import ProducerDep, SettingsDep

_ACTIONS: dict[str, Literal["created", "updated"]] = {
    "ANNOTATION_CREATED": "created",
    "ANNOTATION_UPDATED": "updated",
}
DELETED_ACTION = "ANNOTATIONS_DELETED"
HANDLED_ACTIONS = (*_ACTIONS, DELETED_ACTION)
EVENT_ID_PREFIX = "labelstudio-annotation-"
SECRET_HEADER = "X-Proxyloop-Secret"
# A pairwise result in provision.PAIRWISE_CONFIG. Label Studio's editor writes a <Pairwise> result with
# to_name equal to the tag's own name ("pw"), not its toName ("a,b"), and only renders a prediction
# written that way: with "a,b" the suggestion was stored but neither response showed as selected.
# The conversion below reads only the result's type and value, so either name converts alike.
PAIRWISE_FROM_NAME, PAIRWISE_TO_NAME = "pw", "pw"
# What a task's data must hold (provision.PAIRWISE_CONFIG shows the text ones); a task with "x" is a feature task.
TEXT_TASK_FIELDS = ("prompt", "answer_a", "answer_b")
FEATURE_TASK_FIELDS = ("x", "y_a", "y_b")

router = APIRouter(tags=["labelstudio"])


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class LSResult(_Loose):
    from_name: str
    to_name: str | None = None
    type: str
    value: dict[str, Any]


class LSAnnotation(_Loose):
    id: int
    result: list[LSResult]
    completed_by: int | dict[str, Any] | None = None
    updated_at: datetime | None = None
    task: int | None = None
    was_cancelled: bool = False


class LSTask(_Loose):
    id: int
    data: dict[str, Any]


class LSWebhook(_Loose):
    """The part of Label Studio's ANNOTATION_CREATED/UPDATED payload that we read."""

    action: str
    annotation: LSAnnotation
    task: LSTask
    project: dict[str, Any] | None = None


class LSDeletedRef(_Loose):
    id: int
    completed_by: int | dict[str, Any] | None = None


class LSDeletionWebhook(_Loose):
    """ANNOTATIONS_DELETED: only the ids of the deleted annotations."""

    action: Literal["ANNOTATIONS_DELETED"]
    annotations: list[LSDeletedRef]
    project: dict[str, Any] | None = None


class UnusableAnnotation(ValueError):
    pass


def event_id_for(annotation_id: int) -> str:
    return f"{EVENT_ID_PREFIX}{annotation_id}"


def annotation_id_of(event_id: str) -> int:
    return int(event_id.removeprefix(EVENT_ID_PREFIX))


def _choice(annotation: LSAnnotation) -> Literal["a", "b"]:
    # Checked first: Label Studio's `was_cancelled` means "User skipped the task" (its Annotation model), and a
    # skip submits whatever the editor held, a pairwise click included. The annotator declined to judge: no label.
    if annotation.was_cancelled:
        raise UnusableAnnotation(f"annotation {annotation.id} was skipped by the annotator; it carries no label")
    for result in annotation.result:
        if result.type == "pairwise":
            selected = result.value.get("selected")
            if selected in ("left", "right"):
                return "a" if selected == "left" else "b"
            raise UnusableAnnotation(f"pairwise result has selected={selected!r}; expected 'left' or 'right'")
    raise UnusableAnnotation("annotation has no pairwise result; is the project's labelling config pairwise?")


def _rationale(annotation: LSAnnotation) -> str | None:
    """A TextArea's text: Label Studio sends a list of lines; a client that sends one string must not get it
    back as one character per line."""
    for result in annotation.result:
        text = result.value.get("text") if result.type == "textarea" else None
        if isinstance(text, str) and text:
            return text
        if isinstance(text, list) and text:
            return "\n".join(str(line) for line in text)
    return None


def _output_id(data: dict[str, Any], name: str) -> int:
    """An output id as an int. A float is taken only when integral (1.0, never 1.7: truncating would store
    a comparison the annotator never saw); a bool is refused though Python counts it an int; a string of
    an integer is taken, as a CSV import into Label Studio gives one (flows.acquisition reads it alike)."""
    value = data.get(name)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    found = "is missing" if name not in data else f"is {value!r}"
    raise UnusableAnnotation(f"task data {name!r} {found}; a feature task (one with 'x') needs integer output ids "
                             f"{', '.join(map(repr, FEATURE_TASK_FIELDS[1:]))}")


def _text_field(data: dict[str, Any], name: str) -> str | None:
    """What is wrong with one text field, or None when it is a non-empty string."""
    value = data.get(name)
    if name not in data or value is None:
        return f"{name!r} is missing"
    if not isinstance(value, str):
        return f"{name!r} is not a string ({type(value).__name__})"
    return None if value.strip() else f"{name!r} is empty"


def _item(task: LSTask, choice: Literal["a", "b"], rationale: str | None) -> Item:
    """The labelled item; a task missing what the label needs is refused, never stored with blanks or guesses."""
    data = task.data
    if "x" in data:
        # Paper 1's feature setting: the task carries x and the output ids behind each answer.
        y_a, y_b = _output_id(data, "y_a"), _output_id(data, "y_b")
        y_w, y_l = (y_a, y_b) if choice == "a" else (y_b, y_a)
        return FeatureTriple(x=data["x"], y_w=y_w, y_l=y_l)
    problems = [p for p in (_text_field(data, name) for name in TEXT_TASK_FIELDS) if p]
    if problems:
        text, feature = (", ".join(map(repr, fields)) for fields in (TEXT_TASK_FIELDS, FEATURE_TASK_FIELDS))
        raise UnusableAnnotation(f"task {task.id}: {'; '.join(problems)}. A text task needs non-empty {text} "
                                 f"(a feature task: {feature}); its data has {sorted(data)}")
    return PairwiseText(
        prompt=data["prompt"], response_a=data["answer_a"], response_b=data["answer_b"], choice=choice,
        rationale=rationale,
    )


def _annotator(completed_by: int | dict[str, Any] | None) -> str:
    annotator = completed_by.get("id") if isinstance(completed_by, dict) else completed_by
    return f"labelstudio-user-{annotator}"


def expert_label_from_annotation(
    annotation: LSAnnotation, task: LSTask, action: Literal["created", "updated"] = "created",
) -> ExpertLabel:
    """One annotation (from a webhook or the API) as an event; raises UnusableAnnotation with the reason."""
    return ExpertLabel(
        event_id=event_id_for(annotation.id),
        annotator_id=_annotator(annotation.completed_by),
        action=action,
        # Label Studio sends UTC ("...Z"); a naive time (an older server, a hand-made payload) is read as UTC
        # rather than refused by the contract, which takes only times with a zone.
        occurred_at=as_utc(annotation.updated_at) if annotation.updated_at else utcnow(),
        item=_item(task, _choice(annotation), _rationale(annotation)),
    )


def retraction(annotation_id: int, annotator: int | dict[str, Any] | None = None) -> ExpertLabel:
    """The event that retracts a deleted annotation; stamped now, so it wins over any older copy."""
    return ExpertLabel(event_id=event_id_for(annotation_id), annotator_id=_annotator(annotator), action="deleted",
                       occurred_at=utcnow())


_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def _handled_action(payload: object, handled: tuple[str, ...]) -> str:
    """The payload's action, checked before its shape: another action's payload has other fields, and
    "not handled" says more than the validation errors its shape would give."""
    if not isinstance(payload, dict):
        kind = _JSON_KINDS.get(type(payload), type(payload).__name__)
        raise UnusableAnnotation(f"payload is a JSON {kind}, not an object with an 'action'")
    action = payload.get("action")
    if action not in handled:
        raise UnusableAnnotation(f"action {action!r} is not handled; expected one of {sorted(handled)}")
    return str(action)


def expert_label_from_webhook(payload: dict[str, Any]) -> ExpertLabel:
    """ANNOTATION_CREATED/UPDATED → one event. Raises UnusableAnnotation or pydantic.ValidationError."""
    action = _ACTIONS[_handled_action(payload, tuple(_ACTIONS))]
    hook = LSWebhook.model_validate(payload)
    return expert_label_from_annotation(hook.annotation, hook.task, action)


def expert_labels_from_webhook(payload: dict[str, Any]) -> list[ExpertLabel]:
    """Any handled webhook → its events (ANNOTATIONS_DELETED names several annotations)."""
    if _handled_action(payload, HANDLED_ACTIONS) == DELETED_ACTION:
        hook = LSDeletionWebhook.model_validate(payload)
        return [retraction(ref.id, ref.completed_by) for ref in hook.annotations]
    return [expert_label_from_webhook(payload)]


def webhook_payload(
    task_id: int, annotation_id: int, data: dict[str, Any], selected: Literal["left", "right"],
    annotator: int = 1, project_id: int = 1, action: str = "ANNOTATION_CREATED",
) -> dict[str, Any]:
    """What Label Studio 1.23 POSTs for ANNOTATION_CREATED (fields we do not read trimmed)."""
    now = utcnow().isoformat()
    return {
        "action": action,
        "annotation": {
            "id": annotation_id,
            "result": [{"from_name": PAIRWISE_FROM_NAME, "to_name": PAIRWISE_TO_NAME, "type": "pairwise",
                        "origin": "manual",
                        "value": {"selected": selected}}],
            "completed_by": annotator, "created_at": now, "updated_at": now, "task": task_id,
            "project": project_id, "was_cancelled": False, "ground_truth": False, "lead_time": 3.2,
        },
        "project": {"id": project_id, "title": "proxyloop pairwise"},
        "task": {"id": task_id, "data": data, "project": project_id, "is_labeled": True},
    }


# The route: secret check, conversion above, publish; 200 only once Kafka acknowledged every label.


class WebhookAccepted(BaseModel):
    event_id: str
    event_ids: list[str]
    topic: str


# auto_error=False: a missing header gets the same 401 and message as a wrong one.
_secret_header = APIKeyHeader(name=SECRET_HEADER, auto_error=False, description="The shared webhook secret.")


def secret_matches(presented: str | None, settings: Settings) -> bool:
    """The shared webhook secret, compared in constant time; None (nothing presented) never matches."""
    return presented is not None and hmac.compare_digest(presented.encode(), settings.webhook_secret.encode())


def require_webhook_secret(settings: SettingsDep, secret: Annotated[str | None, Depends(_secret_header)]) -> None:
    if not secret_matches(secret, settings):
        raise HTTPException(401, f"missing or wrong {SECRET_HEADER} header")


def broker_unavailable(reason: str) -> HTTPException:
    """503: no broker took the label, so nothing is acknowledged; Label Studio's resend or the next reconciliation
    (reconcile.py) delivers it once the broker is back. `reason` names PROXYLOOP_KAFKA_BOOTSTRAP."""
    return HTTPException(503, f"label not accepted: {reason}", headers={"Retry-After": "10"})


def _publish_all(producer: KafkaProducer, topic: str, labels: list[ExpertLabel]) -> None:
    futures = [publish(producer, topic, label, wait=False) for label in labels]
    producer.flush()
    for future in futures:
        future.get(timeout=30)


@router.post("/webhooks/labelstudio", response_model=WebhookAccepted, dependencies=[Depends(require_webhook_secret)])
async def receive_labelstudio_webhook(
    request: Request, settings: SettingsDep, producer: ProducerDep
) -> WebhookAccepted:
    """Receive a Label Studio annotation webhook; 200 only once Kafka has the label. Anything unusable (not
    JSON, another action, a skipped annotation, a task without what the label needs) is a 422 with the reason,
    decided before anything is published: a label half-read or guessed at would be stored as the expert's."""
    try:
        payload = await request.json()
    except RecursionError as exc:  # json's parser recurses per nesting level: [[[[...]]]] exhausts the stack
        raise HTTPException(422, "unusable Label Studio payload: JSON nested too deeply to parse") from exc
    except ValueError as exc:  # not JSON, or not UTF-8
        raise HTTPException(422, f"unusable Label Studio payload: body is not JSON: {exc}") from exc
    try:
        labels = expert_labels_from_webhook(payload)
    except (ValueError, ValidationError, RecursionError) as exc:  # refused before anything is published
        raise HTTPException(422, f"unusable Label Studio payload: {exc}") from exc
    try:
        await run_in_threadpool(_publish_all, producer, settings.topic_expert, labels)
    except KafkaError as exc:  # the broker went away after the producer opened: unacknowledged, so no 200
        raise broker_unavailable(f"Kafka at {settings.kafka_bootstrap} (PROXYLOOP_KAFKA_BOOTSTRAP) did not "
                                 f"acknowledge it: {exc}") from exc
    ids = [label.event_id for label in labels]
    return WebhookAccepted(event_id=ids[0] if ids else "", event_ids=ids, topic=settings.topic_expert)
