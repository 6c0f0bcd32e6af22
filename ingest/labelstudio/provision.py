"""Provision a Label Studio project for pairwise preferences: labelling config, tasks, webhook.

Run: `proxyloop labelstudio setup [--tasks FILE.jsonl]`. Idempotent: the project is found by title
and the webhook by URL, so running it again only imports the tasks given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from label_studio_sdk.client import LabelStudio

from ground.settings import Settings
from ingest.labelstudio.embedded import embedded_token
from ingest.labelstudio.webhook import SECRET_HEADER

# The task's `prompt`, `answer_a` and `answer_b` are shown; the annotator picks one side and may say why.
# Feature tasks (paper 1) carry `x`, `y_a`, `y_b` as well; the webhook reads those instead.
PAIRWISE_CONFIG = """<View>
  <Header value="$prompt"/>
  <Pairwise name="pw" toName="a,b" selectionStyle="background-color: #d8f5ec; outline: 2px solid #27c2a8;"/>
  <View style="display: flex; gap: 2%;">
    <View style="width: 49%; padding: 12px; border: 1px solid #ccc; border-radius: 6px;">
      <Header value="Response A (click to prefer)" size="6"/>
      <Text name="a" value="$answer_a"/>
    </View>
    <View style="width: 49%; padding: 12px; border: 1px solid #ccc; border-radius: 6px;">
      <Header value="Response B (click to prefer)" size="6"/>
      <Text name="b" value="$answer_b"/>
    </View>
  </View>
  <TextArea name="why" toName="a" placeholder="Why is it better? (optional)" maxSubmissions="1" editable="true"/>
</View>"""

# What the receiver acts on (webhook.py): ANNOTATIONS_CREATED is the bulk creation (predictions turned into
# annotations), TASKS_DELETED deletes annotations without an ANNOTATIONS_DELETED. Every one must be handled there.
WEBHOOK_ACTIONS = ["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED",
                   "TASKS_DELETED"]
REQUIRED_TASK_KEYS = ("prompt", "answer_a", "answer_b")


class LabelStudioSetupError(RuntimeError):
    pass


@dataclass(frozen=True)
class ProvisionedProject:
    project_id: int
    webhook_id: int
    ml_backend_id: int | None  # None when Label Studio refused it; `ml_backend_problem` says why
    ml_backend_problem: str
    tasks_imported: int
    created: bool


def client_for(settings: Settings) -> LabelStudio:
    """A client with the settings' token, or the embedded Label Studio's (ingest.labelstudio.embedded)."""
    token = embedded_token(settings)
    if not token:
        raise LabelStudioSetupError(
            "no Label Studio API token: set PROXYLOOP_LABELSTUDIO_TOKEN (Account & Settings → Legacy Token)"
            + (", or start the embedded one (`proxyloop up`)" if settings.embedded_labelstudio else "")
        )
    return LabelStudio(base_url=settings.labelstudio_url, api_key=token)


def read_tasks(path: Path) -> list[dict[str, Any]]:
    """One JSON object per line with at least prompt, answer_a, answer_b."""
    tasks: list[dict[str, Any]] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            task = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LabelStudioSetupError(f"{path}:{number}: not JSON: {exc}") from exc
        missing = [k for k in REQUIRED_TASK_KEYS if not isinstance(task, dict) or k not in task]
        if missing:
            raise LabelStudioSetupError(f"{path}:{number}: task lacks {missing}; each needs {list(REQUIRED_TASK_KEYS)}")
        tasks.append(task)
    return tasks


def find_project(client: LabelStudio, title: str) -> int | None:
    project: Any
    for project in client.projects.list(title=title):
        if project.title == title and project.id is not None:
            return int(project.id)
    return None


def setup_project(
    settings: Settings, tasks: list[dict[str, Any]] | None = None, client: LabelStudio | None = None,
) -> ProvisionedProject:
    """Create (or reuse) the project, import `tasks`, and point a webhook with the shared secret at us."""
    client = client or client_for(settings)
    title = settings.labelstudio_project_title
    project_id = find_project(client, title)
    created = project_id is None
    if project_id is None:
        project = client.projects.create(title=title, label_config=PAIRWISE_CONFIG,
                                         description="Pairwise preferences collected by proxyloop.")
        assert project.id is not None
        project_id = int(project.id)
    imported = 0
    if tasks:
        client.projects.import_tasks(id=project_id, request=tasks)  # type: ignore[arg-type]
        imported = len(tasks)
    webhook_id = ensure_webhook(settings, client, project_id)
    ml_backend_id, problem = ensure_ml_backend(settings, client, project_id)
    return ProvisionedProject(project_id=project_id, webhook_id=webhook_id, ml_backend_id=ml_backend_id,
                              ml_backend_problem=problem, tasks_imported=imported, created=created)


def ensure_webhook(settings: Settings, client: LabelStudio, project_id: int, active: bool = True) -> int:
    """The project's webhook to our receiver, with the secret header; created or brought up to date."""
    url = settings.resolved_labelstudio_webhook_url
    options: dict[str, Any] = {
        "headers": {SECRET_HEADER: settings.webhook_secret}, "actions": WEBHOOK_ACTIONS,
        "send_payload": True, "send_for_all_actions": False, "is_active": active,
    }
    for hook in client.webhooks.list(project=str(project_id)):
        if hook.url == url and hook.id is not None:
            client.webhooks.update(hook.id, url=url, **options)
            return int(hook.id)
    hook = client.webhooks.create(url=url, project=project_id, **options)
    if hook.id is None:
        raise LabelStudioSetupError(f"Label Studio at {settings.labelstudio_url} returned a webhook without an id")
    return int(hook.id)


ML_BACKEND_TITLE = "proxyloop"


def ensure_ml_backend(settings: Settings, client: LabelStudio, project_id: int) -> tuple[int | None, str]:
    """Connect the project to proxyloop's ML backend (pre-annotations and acquisition scores), authenticated
    with the webhook's secret as the Basic-auth password; created or brought up to date, found by URL.
    Returns (its id, "") or (None, why Label Studio refused it).

    Label Studio checks the backend's health before it accepts one, so the HTTP app must be running where
    `resolved_labelstudio_ml_backend_url` points, and a Label Studio that should reach a private or loopback
    address needs `ML_BLOCK_LOCAL_IP=false` (scripts/labelstudio.sh sets it for the embedded one). Without the
    backend the project still collects labels; tasks just carry no predictions until setup runs again."""
    from label_studio_sdk.core.api_error import ApiError

    url = settings.resolved_labelstudio_ml_backend_url
    options: dict[str, Any] = {"project": project_id, "url": url, "title": ML_BACKEND_TITLE, "is_interactive": False,
                               "auth_method": "BASIC_AUTH", "basic_auth_user": "labelstudio",
                               "basic_auth_pass": settings.webhook_secret}
    try:
        found = next((int(b.id) for b in client.ml.list(project=project_id) if b.url == url and b.id is not None), None)
        if found is not None:
            client.ml.update(found, **options)
        else:
            found = client.ml.create(**options).id
    except ApiError as exc:
        if exc.status_code in (400, 403):  # health check failed, or a refused (e.g. loopback) address
            return None, f"Label Studio refused {url} ({exc.status_code}): {exc.body}"
        raise
    if found is None:
        raise LabelStudioSetupError(f"Label Studio at {settings.labelstudio_url} returned an ML backend without an id")
    _secure_training_webhook(settings, client, project_id, f"{url}/webhook")
    return int(found), ""


def _secure_training_webhook(settings: Settings, client: LabelStudio, project_id: int, url: str) -> None:
    """Connecting a backend makes Label Studio add a webhook to its /webhook, with no headers; ours refuses
    requests without the secret, so the hook gets the secret header (it is how new labels re-rank tasks)."""
    wanted = {SECRET_HEADER: settings.webhook_secret}
    for hook in client.webhooks.list(project=str(project_id)):
        if hook.url == url and hook.id is not None and hook.headers != wanted:
            client.webhooks.update(hook.id, url=url, headers=wanted)
