"""Label Studio's ML-backend protocol, served by the HTTP app under /labelstudio/ml (issue 17).

Label Studio calls GET /health and POST /setup when the backend is connected (`POST /api/ml`), POST
/predict with the tasks it wants predictions for, POST /webhook with annotation events when
"training" is on, and for its "Start Training" button POST /webhook with START_TRAINING (with the
START_TRAINING flag) or POST /train (without it); newer versions list the backend's model versions
with GET /versions. Each of the training calls requests a refresh, as a label does.
Shapes as in HumanSignal/label-studio-ml-backend (label_studio_ml/api.py):
/predict answers {"results": [{"result": [...], "score": s, "model_version": v}, ...]} in task order.

Each prediction pre-annotates the pairwise choice the current policy prefers (a prediction, which
Label Studio shows as a suggestion the annotator accepts or overrides) and carries the task's
acquisition score (policies/acquisition.py) as `score`, so the task list sorts by it. Feature and chat
tasks share the project's one labelling config (ingest.labelstudio.provision.PAIRWISE_CONFIG: the
<Pairwise name="pw"> control over responses a and b), so one result body serves both; which scorer
scored a task is the refresh's business, and the cache holds both kinds. Scores are
computed by the `refresh-acquisition` flow (flows/acquisition.py) and kept in a small JSON file
(`ScoreCache`); /predict only reads it, so no model runs in a request. Label Studio asks /predict only
about a task with no prediction, so the flow also writes each task's `prediction` into Label Studio
through its API (ingest.labelstudio.predictions): one function builds both. A task the last refresh did
not score gets the highest score, log 2: it is unknown, so it is asked about early. A task Label Studio
sends with an annotation is no longer open (the refresh leaves it out): it gets score 0 and no
pre-annotation, so it sorts below every open task rather than above them as an unknown one would.

Auth: the webhook's shared secret, either in the X-Proxyloop-Secret header or as the password of
HTTP Basic auth (what Label Studio's ML-backend connection can send; the user name is ignored).
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from ground.moments import utcnow
from ground.schemas import ACQUISITION_REQUESTED_EVENT
from ground.settings import ML_BACKEND_PATH, Settings
from ingest import prefect_events
from ingest.labelstudio.payloads import PAIRWISE_FROM_NAME, PAIRWISE_TO_NAME
from ingest.labelstudio.webhook import SECRET_HEADER, secret_matches
from ingest.web import SettingsDep, json_body
from policies.acquisition import MAX_SCORE, AcquisitionScores

ML_BACKEND_PREFIX = ML_BACKEND_PATH
MODEL_CLASS = "proxyloop.acquisition"
UNSCORED_VERSION = "proxy"  # the predictions' model version before the first refresh


class TaskScore(BaseModel):
    score: float = Field(ge=0.0)
    preferred: Literal["a", "b"]
    prob_a: float = Field(ge=0.0, le=1.0)


class ScoreCache(BaseModel):
    """The last refresh: one score per open task, keyed by Label Studio task id."""

    refreshed_at: datetime = Field(default_factory=utcnow)
    model_version: str = UNSCORED_VERSION  # the registry version the scores came from
    started_at: datetime | None = None  # when the refresh began reading labels and tasks (flows.acquisition)
    method: str = "none"
    n_labels: int = 0  # expert labels the scores were computed from
    tasks: dict[int, TaskScore] = Field(default_factory=dict)

    @classmethod
    def from_scores(cls, task_ids: list[int], scores: AcquisitionScores, model_version: str) -> ScoreCache:
        if len(task_ids) != len(scores):
            raise ValueError(f"{len(task_ids)} task ids for {len(scores)} scores")
        tasks = {t: TaskScore(score=float(s), preferred=c, prob_a=float(p)) for t, s, c, p in
                 zip(task_ids, scores.scores, scores.preferred(), scores.prob_a, strict=True)}
        return cls(model_version=model_version, method=scores.method, n_labels=scores.n_labels, tasks=tasks)

    @classmethod
    def combined(cls, parts: Sequence[ScoreCache]) -> ScoreCache:
        """One cache from each task kind's scorer (a project may hold feature and chat tasks): every part's tasks;
        versions and methods joined by '+' ("appendix-d@3+chat@2"), so every prediction carries the one version
        the project selects; expert labels summed. A task scored by two parts is an error."""
        if len(parts) < 2:
            return parts[0] if parts else cls()
        tasks: dict[int, TaskScore] = {}
        for part in parts:
            twice = sorted(tasks.keys() & part.tasks.keys())
            if twice:
                raise ValueError(f"tasks {twice[:5]} scored by both {part.model_version} and another scorer")
            tasks.update(part.tasks)
        return cls(model_version="+".join(p.model_version for p in parts), method="+".join(p.method for p in parts),
                   n_labels=sum(p.n_labels for p in parts), tasks=tasks)


def cache_path(settings: Settings) -> Path:
    return settings.home_dir / "acquisition" / "scores.json"


def read_cache(settings: Settings) -> ScoreCache | None:
    """The last refresh's scores, or None before the first (or if the file is unreadable)."""
    path = cache_path(settings)
    try:
        return ScoreCache.model_validate_json(path.read_text())
    except (OSError, ValueError):  # missing, a directory, unreadable, or not the cache
        return None


def write_cache(settings: Settings, cache: ScoreCache) -> Path:
    """Atomically replace the cache (readers never see half a file)."""
    path = cache_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".scores-", suffix=".json")
    with os.fdopen(fd, "w") as handle:
        handle.write(cache.model_dump_json())
    os.replace(tmp, path)
    return path


def is_our_version(model_version: str | None, *policy_names: str) -> bool:
    """Whether a Label Studio prediction's model version is one `prediction` writes (one of the policies', any release,
    alone or first of a combined cache's)."""
    return model_version == UNSCORED_VERSION or any((model_version or "").startswith(f"{n}@") for n in policy_names)


def prediction(task_id: int | None, cache: ScoreCache | None, labelled: bool = False) -> dict[str, Any]:
    """One Label Studio prediction: the preferred side as a pairwise pre-annotation, the score. A task
    already `labelled` has nothing left to ask: score 0, no pre-annotation. /predict answers with it, and
    the refresh flow writes it into Label Studio (flows.acquisition)."""
    version = cache.model_version if cache else UNSCORED_VERSION
    if labelled:
        return {"result": [], "score": 0.0, "model_version": version}
    entry = cache.tasks.get(task_id) if cache and task_id is not None else None
    if entry is None:
        return {"result": [], "score": MAX_SCORE, "model_version": version}
    result = {"from_name": PAIRWISE_FROM_NAME, "to_name": PAIRWISE_TO_NAME, "type": "pairwise",
              "origin": "prediction", "value": {"selected": "left" if entry.preferred == "a" else "right"}}
    return {"result": [result], "score": entry.score, "model_version": version}


# The router.


def _basic_password(authorization: str | None) -> str | None:
    if not authorization or not authorization.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    return decoded.partition(":")[2]


def require_backend_secret(request: Request, settings: SettingsDep) -> None:
    """The webhook's shared secret, in its header or as the Basic-auth password."""
    for presented in (request.headers.get(SECRET_HEADER), _basic_password(request.headers.get("authorization"))):
        if secret_matches(presented, settings):
            return
    raise HTTPException(401, f"missing or wrong {SECRET_HEADER} header (or Basic-auth password)")


router = APIRouter(tags=["labelstudio-ml-backend"], dependencies=[Depends(require_backend_secret)])


class PredictRequest(BaseModel):
    tasks: list[dict[str, Any]] = Field(default_factory=list)
    project: str | int | None = None
    label_config: str | None = None
    params: dict[str, Any] | None = None


class SetupRequest(BaseModel):
    project: str | int | None = None
    schema_: str | None = Field(None, alias="schema")
    hostname: str | None = None
    access_token: str | None = None
    model_version: str | None = None
    extra_params: Any = None


@router.get("/health")
@router.get("/")
def health(settings: SettingsDep) -> dict[str, Any]:
    cache = read_cache(settings)
    return {"status": "UP", "model_class": MODEL_CLASS,
            "model_version": cache.model_version if cache else UNSCORED_VERSION}


@router.post("/setup")
def setup(body: SetupRequest, settings: SettingsDep) -> dict[str, str]:
    cache = read_cache(settings)
    return {"model_version": cache.model_version if cache else UNSCORED_VERSION}


@router.post("/predict")
def predict(body: PredictRequest, settings: SettingsDep) -> dict[str, Any]:
    cache = read_cache(settings)
    results = []
    for task in body.tasks:
        task_id = task.get("id")
        # Label Studio sends each task with its annotations (TaskSimpleSerializer); any one closes it, as
        # flows.acquisition.open_tasks counts it.
        usable = isinstance(task_id, int) and not isinstance(task_id, bool)  # JSON true is no task 1
        results.append(prediction(task_id if usable else None, cache,
                                  labelled=bool(task.get("annotations"))))
    return {"results": results, "model_version": cache.model_version if cache else UNSCORED_VERSION}


def request_refresh(reason: str, project: object = None) -> None:
    """Send the Prefect event the `refresh-acquisition` deployment is triggered by; raises PrefectUnreachable
    unless the server has it, so the webhook's answer never says "requested" for an event that was dropped."""
    prefect_events.emit(ACQUISITION_REQUESTED_EVENT, {"prefect.resource.id": "proxyloop.acquisition"},
                        {"reason": reason, "project": json.loads(json.dumps(project, default=str))})


# What requests a refresh on /webhook: any annotation event, and the "Start Training" button's START_TRAINING.
TRAINING_ACTIONS = ("START_TRAINING",)


def _refreshes(action: str) -> bool:
    return action.startswith("ANNOTATION") or action in TRAINING_ACTIONS


def _project_id(project: object) -> object:
    return project.get("id") if isinstance(project, dict) else project


async def _request_refresh(reason: str, project: object) -> str:
    """Whether the refresh was requested ("requested", or "not requested: why"). Prefect unreachable never fails
    the call: the label itself travels by the ingest webhook, and the next label or refresh catches up."""
    try:
        await run_in_threadpool(request_refresh, reason, _project_id(project))
    except Exception as exc:
        return f"not requested: {exc}"
    return "requested"


@router.post("/webhook", status_code=201)
async def webhook(request: Request) -> dict[str, Any]:
    """Label Studio's training webhook: acknowledged at once; an annotation event or START_TRAINING requests a
    refresh (the deployment's rate limit turns a burst into one refresh)."""
    payload = await json_body(request, "webhook body")
    action = payload.get("action") if isinstance(payload, dict) else None
    if not isinstance(action, str):
        raise HTTPException(422, "webhook body needs an 'action'")
    if len(action) > 100 or not action.isascii():  # echoed back: a lone surrogate could not be encoded (a 500)
        raise HTTPException(422, f"webhook action {action[:100]!r} is not a Label Studio action name")
    if not _refreshes(action):
        return {"status": "ignored", "action": action}
    return {"status": "ok", "action": action, "refresh": await _request_refresh(action, payload.get("project"))}


@router.post("/train", status_code=201)
async def train(request: Request) -> dict[str, Any]:
    """The "Start Training" button of a Label Studio without the START_TRAINING flag (it POSTs the project's annotations
    here); was a 404 that Label Studio showed as a failed training. Requests a refresh, as /webhook does."""
    payload = await json_body(request, "train body", empty={})
    project = payload.get("project") if isinstance(payload, dict) else None
    return {"status": "ok", "action": "train", "refresh": await _request_refresh("train", project)}


@router.get("/versions")
def versions(settings: SettingsDep) -> dict[str, list[str]]:
    """The model versions Label Studio may select (newer versions ask; a 404 broke its model list): the
    current one, what /predict and the refresh write."""
    cache = read_cache(settings)
    return {"versions": [cache.model_version if cache else UNSCORED_VERSION]}
