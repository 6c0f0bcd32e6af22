"""Label Studio's side of ingest: the webhook (route and payload → `ExpertLabel`), project
provisioning (`proxyloop labelstudio setup`) and reconciliation (`proxyloop labelstudio reconcile`).
"""

from ingest.labelstudio.payloads import UnusableAnnotation, expert_label_from_annotation, webhook_payload
from ingest.labelstudio.webhook import (
    SECRET_HEADER,
    WebhookAccepted,
    expert_label_from_webhook,
    expert_labels_from_webhook,
    router,
)

__all__ = [
    "SECRET_HEADER",
    "UnusableAnnotation",
    "WebhookAccepted",
    "expert_label_from_annotation",
    "expert_label_from_webhook",
    "expert_labels_from_webhook",
    "router",
    "webhook_payload",
]
