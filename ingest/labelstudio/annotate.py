"""Submit expert labels the two ways the demo does.

- `annotate_tasks`: through Label Studio's API as an annotator would: import the tasks into the project,
  then one pairwise choice per task (POST /api/tasks/{id}/annotations, token auth). The labels reach
  proxyloop the way every annotator's do: Label Studio's webhook → the receiver → Kafka → the store,
  under the event id `labelstudio-annotation-{annotation id}`. `proxyloop demo` takes this path when the
  stack runs Label Studio (PROXYLOOP_EMBEDDED_LABELSTUDIO).
- `post_webhook_payloads`: without a Label Studio, the payloads it would send, posted to the receiver, marked
  simulated: their labels record a source no project has (payloads.SIMULATED_SOURCE), so a Label Studio enabled
  later, whose project 1 never had their annotations, has none of them retracted by its reconciliation.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx
from label_studio_sdk.client import LabelStudio
from tenacity import RetryCallState, Retrying, retry_if_result, stop_after_attempt, wait_incrementing

from ground.settings import Settings
from ingest.labelstudio.payloads import PAIRWISE_FROM_NAME, PAIRWISE_TO_NAME, event_id_for, webhook_payload
from ingest.labelstudio.provision import LabelStudioSetupError, client_for, find_project, setup_project
from ingest.labelstudio.webhook import SECRET_HEADER

Selected = Literal["left", "right"]


@dataclass(frozen=True)
class Annotated:
    project_id: int
    task_ids: list[int]
    annotation_ids: list[int]

    @property
    def event_ids(self) -> list[str]:
        """The ids the store keeps these labels under, once the webhook delivered them."""
        return [event_id_for(annotation) for annotation in self.annotation_ids]


def pairwise_result(selected: Selected) -> list[dict[str, Any]]:
    """An annotation's result in the project's labelling config (provision.PAIRWISE_CONFIG)."""
    return [{"from_name": PAIRWISE_FROM_NAME, "to_name": PAIRWISE_TO_NAME, "type": "pairwise",
             "value": {"selected": selected}}]


def import_tasks(client: LabelStudio, project_id: int, tasks: Sequence[dict[str, Any]]) -> list[int]:
    """Import task data (one dict per task) and return the new tasks' ids, in order."""
    response = client.projects.import_tasks(id=project_id, request=list(tasks),  # type: ignore[arg-type]
                                            return_task_ids=True)
    task_ids = (response.model_extra or {}).get("task_ids") or getattr(response, "task_ids", None)
    if not isinstance(task_ids, list) or len(task_ids) != len(tasks):
        raise LabelStudioSetupError(f"Label Studio imported {response.task_count} of {len(tasks)} tasks into project "
                                    f"{project_id} without returning their ids (an asynchronous import?)")
    return [int(t) for t in task_ids]


def annotate_tasks(settings: Settings, labelled: Sequence[tuple[dict[str, Any], Selected]],
                   client: LabelStudio | None = None) -> Annotated:
    """Import each task's data into the settings' project (provisioned first if missing) and submit its choice."""
    client = client or client_for(settings)
    project_id = find_project(client, settings.labelstudio_project_title)
    if project_id is None:
        project_id = setup_project(settings, client=client).project_id
    task_ids = import_tasks(client, project_id, [data for data, _ in labelled])
    annotation_ids: list[int] = []
    for task_id, (_, selected) in zip(task_ids, labelled, strict=True):
        annotation = client.annotations.create(id=task_id, result=pairwise_result(selected))
        if annotation.id is None:
            raise LabelStudioSetupError(f"Label Studio returned an annotation of task {task_id} without an id")
        annotation_ids.append(int(annotation.id))
    return Annotated(project_id=project_id, task_ids=task_ids, annotation_ids=annotation_ids)


class WebhookRefused(RuntimeError):
    pass


def _last_response(state: RetryCallState) -> httpx.Response:
    assert state.outcome is not None
    response: httpx.Response = state.outcome.result()
    return response


def post_webhook(client: httpx.Client, settings: Settings, payload: dict[str, Any],
                 attempts: int = 3) -> httpx.Response:
    """POST one annotation; a 5xx (the receiver could not get Kafka's ack) is retried, as the event id makes it
    idempotent."""
    post = Retrying(retry=retry_if_result(lambda response: response.status_code >= 500),
                    stop=stop_after_attempt(attempts), wait=wait_incrementing(start=1, increment=1),
                    retry_error_callback=_last_response)
    response: httpx.Response = post(client.post, "/webhooks/labelstudio", json=payload,
                                    headers={SECRET_HEADER: settings.webhook_secret})
    return response


def post_webhook_payloads(settings: Settings, labelled: Sequence[tuple[dict[str, Any], Selected]]) -> list[str]:
    """Each label as the ANNOTATION_CREATED payload Label Studio would post, posted to the receiver at the
    settings' HTTP app, marked simulated (no project's); the event ids it answered. Raises WebhookRefused on a
    non-200 answer."""
    event_ids: list[str] = []
    annotation_base = uuid.uuid4().int % 10**9
    with httpx.Client(base_url=settings.http_url, timeout=30) as client:
        for i, (data, selected) in enumerate(labelled):
            payload = webhook_payload(task_id=annotation_base + i, annotation_id=annotation_base + i, data=data,
                                      selected=selected, annotator=7, simulated=True)
            response = post_webhook(client, settings, payload)
            if response.status_code != 200:
                raise WebhookRefused(f"webhook answered {response.status_code}: {response.text}")
            event_ids.append(response.json()["event_id"])
    return event_ids
