"""Label Studio's side of ingest: its webhook payload → `ExpertLabel`, and the receiver route.

The receiver checks the shared secret, publishes to Kafka and answers only after the broker
acknowledged, so a 200 means the label is durable in the log.
"""

from __future__ import annotations

import hmac
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from kafka import KafkaProducer
from pydantic import BaseModel, ConfigDict, ValidationError

from ingest.bus import publish
from ingest.schemas import ExpertLabel, FeatureTriple, Item, PairwiseText, utcnow
from proxyloop.settings import Settings

SECRET_HEADER = "X-Proxyloop-Secret"
_ACTIONS: dict[str, Literal["created", "updated"]] = {
    "ANNOTATION_CREATED": "created",
    "ANNOTATION_UPDATED": "updated",
}


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


class LSTask(_Loose):
    id: int
    data: dict[str, Any]


class LSWebhook(_Loose):
    """The part of Label Studio's ANNOTATION_CREATED/UPDATED payload that we read."""

    action: str
    annotation: LSAnnotation
    task: LSTask
    project: dict[str, Any] | None = None


class UnusableAnnotation(ValueError):
    pass


def _choice(annotation: LSAnnotation) -> Literal["a", "b"]:
    for result in annotation.result:
        if result.type == "pairwise":
            selected = result.value.get("selected")
            if selected in ("left", "right"):
                return "a" if selected == "left" else "b"
            raise UnusableAnnotation(f"pairwise result has selected={selected!r}; expected 'left' or 'right'")
    raise UnusableAnnotation("annotation has no pairwise result; is the project's labelling config pairwise?")


def _rationale(annotation: LSAnnotation) -> str | None:
    for result in annotation.result:
        if result.type == "textarea" and result.value.get("text"):
            return "\n".join(result.value["text"])
    return None


def _item(task: LSTask, choice: Literal["a", "b"], rationale: str | None) -> Item:
    data = task.data
    if "x" in data:
        # Paper 1's feature setting: the task carries x and the output ids behind each answer.
        try:
            y_a, y_b = int(data["y_a"]), int(data["y_b"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UnusableAnnotation("task data with 'x' needs integer 'y_a' and 'y_b'") from exc
        y_w, y_l = (y_a, y_b) if choice == "a" else (y_b, y_a)
        return FeatureTriple(x=data["x"], y_w=y_w, y_l=y_l)
    return PairwiseText(
        prompt=data.get("prompt", ""), response_a=data.get("answer_a", ""),
        response_b=data.get("answer_b", ""), choice=choice, rationale=rationale,
    )


def expert_label_from_webhook(payload: dict[str, Any]) -> ExpertLabel:
    """Raises UnusableAnnotation or pydantic.ValidationError with the reason."""
    hook = LSWebhook.model_validate(payload)
    if hook.action not in _ACTIONS:
        raise UnusableAnnotation(f"action {hook.action!r} is not handled; expected one of {sorted(_ACTIONS)}")
    annotation = hook.annotation
    completed_by = annotation.completed_by
    annotator = completed_by.get("id") if isinstance(completed_by, dict) else completed_by
    return ExpertLabel(
        event_id=f"labelstudio-annotation-{annotation.id}",
        annotator_id=f"labelstudio-user-{annotator}",
        action=_ACTIONS[hook.action],
        occurred_at=annotation.updated_at or utcnow(),
        item=_item(hook.task, _choice(annotation), _rationale(annotation)),
    )


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
            "result": [{"from_name": "pw", "to_name": "a,b", "type": "pairwise", "origin": "manual",
                        "value": {"selected": selected}}],
            "completed_by": annotator, "created_at": now, "updated_at": now, "task": task_id,
            "project": project_id, "was_cancelled": False, "ground_truth": False, "lead_time": 3.2,
        },
        "project": {"id": project_id, "title": "proxyloop pairwise"},
        "task": {"id": task_id, "data": data, "project": project_id, "is_labeled": True},
    }


router = APIRouter(tags=["labelstudio"])


class WebhookAccepted(BaseModel):
    event_id: str
    topic: str


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


@router.post("/webhooks/labelstudio", response_model=WebhookAccepted)
async def receive_labelstudio_webhook(
    request: Request, secret: Annotated[str | None, Header(alias=SECRET_HEADER)] = None,
) -> WebhookAccepted:
    """Receive a Label Studio annotation webhook; 200 only once Kafka has the label."""
    settings = _settings(request)
    if secret is None or not hmac.compare_digest(secret, settings.webhook_secret):
        raise HTTPException(401, f"missing or wrong {SECRET_HEADER} header")
    try:
        payload = await request.json()
        label = expert_label_from_webhook(payload)
    except (ValueError, ValidationError) as exc:
        raise HTTPException(422, f"unusable Label Studio payload: {exc}") from exc
    producer: KafkaProducer = request.app.state.producer
    await run_in_threadpool(publish, producer, settings.topic_expert, label, True)
    return WebhookAccepted(event_id=label.event_id, topic=settings.topic_expert)

