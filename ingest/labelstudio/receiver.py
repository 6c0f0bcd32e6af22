"""The webhook receiver: checks the shared secret, publishes to Kafka, answers after the broker's ack.

A 200 therefore means the label is durable in the log.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from kafka import KafkaProducer
from pydantic import BaseModel, ValidationError

from ground.schemas import ExpertLabel
from ground.settings import Settings
from ingest.bus import publish
from ingest.labelstudio.payloads import expert_labels_from_webhook

SECRET_HEADER = "X-Proxyloop-Secret"

router = APIRouter(tags=["labelstudio"])


class WebhookAccepted(BaseModel):
    event_id: str
    event_ids: list[str]
    topic: str


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _publish_all(producer: KafkaProducer, topic: str, labels: list[ExpertLabel]) -> None:
    futures = [publish(producer, topic, label, wait=False) for label in labels]
    producer.flush()
    for future in futures:
        future.get(timeout=30)


@router.post("/webhooks/labelstudio", response_model=WebhookAccepted)
async def receive_labelstudio_webhook(
    request: Request, secret: Annotated[str | None, Header(alias=SECRET_HEADER)] = None,
) -> WebhookAccepted:
    """Receive a Label Studio annotation webhook; 200 only once Kafka has the label."""
    settings = _settings(request)
    if secret is None or not hmac.compare_digest(secret.encode(), settings.webhook_secret.encode()):
        raise HTTPException(401, f"missing or wrong {SECRET_HEADER} header")
    try:
        payload = await request.json()
        labels = expert_labels_from_webhook(payload)
    except (ValueError, ValidationError) as exc:
        raise HTTPException(422, f"unusable Label Studio payload: {exc}") from exc
    producer: KafkaProducer = request.app.state.producer
    await run_in_threadpool(_publish_all, producer, settings.topic_expert, labels)
    ids = [label.event_id for label in labels]
    return WebhookAccepted(event_id=ids[0] if ids else "", event_ids=ids, topic=settings.topic_expert)
