"""The webhook receiver: checks the shared secret, publishes to Kafka, answers after the broker's ack.

A 200 therefore means the label is durable in the log.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyHeader
from kafka import KafkaProducer
from pydantic import BaseModel, ValidationError

from ground.schemas import ExpertLabel
from ingest.bus import publish
from ingest.labelstudio.payloads import expert_labels_from_webhook
from ingest.web import ProducerDep, SettingsDep

SECRET_HEADER = "X-Proxyloop-Secret"

router = APIRouter(tags=["labelstudio"])


class WebhookAccepted(BaseModel):
    event_id: str
    event_ids: list[str]
    topic: str


# auto_error=False: a missing header gets the same 401 and message as a wrong one.
_secret_header = APIKeyHeader(name=SECRET_HEADER, auto_error=False, description="The shared webhook secret.")


def require_webhook_secret(settings: SettingsDep, secret: Annotated[str | None, Depends(_secret_header)]) -> None:
    if secret is None or not hmac.compare_digest(secret.encode(), settings.webhook_secret.encode()):
        raise HTTPException(401, f"missing or wrong {SECRET_HEADER} header")


def _publish_all(producer: KafkaProducer, topic: str, labels: list[ExpertLabel]) -> None:
    futures = [publish(producer, topic, label, wait=False) for label in labels]
    producer.flush()
    for future in futures:
        future.get(timeout=30)


@router.post("/webhooks/labelstudio", response_model=WebhookAccepted, dependencies=[Depends(require_webhook_secret)])
async def receive_labelstudio_webhook(
    request: Request, settings: SettingsDep, producer: ProducerDep
) -> WebhookAccepted:
    """Receive a Label Studio annotation webhook; 200 only once Kafka has the label."""
    try:
        payload = await request.json()
        labels = expert_labels_from_webhook(payload)
    except (ValueError, ValidationError) as exc:
        raise HTTPException(422, f"unusable Label Studio payload: {exc}") from exc
    await run_in_threadpool(_publish_all, producer, settings.topic_expert, labels)
    ids = [label.event_id for label in labels]
    return WebhookAccepted(event_id=ids[0] if ids else "", event_ids=ids, topic=settings.topic_expert)
