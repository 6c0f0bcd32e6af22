"""Write predictions into a Label Studio project through its REST API (issue 17).

Label Studio 1.23 asks an ML backend only about tasks that hold no prediction (opening a task, the data
manager's "Retrieve Predictions"), so scores refreshed later never reach the task list by themselves; its
own dialog recommends updating predictions through the API. `push_predictions` does that for the
`refresh-acquisition` flow: per task, the one prediction of ours is updated in place (PATCH
/api/predictions/{id}), created where the task has none (POST /api/predictions), any further ones of ours
deleted; one that already says the same costs no request. Predictions of other models are left alone.
Then the project's `model_version` is set to the version the predictions carry: the task list's
"Prediction score" column averages only predictions of that version, and the labelling view shows them
(Label Studio accepts a version only once predictions carry it, hence the order).

The prediction bodies are the caller's (policies.ml_backend.prediction builds them, as /predict does).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from typing import Any

from label_studio_sdk.client import LabelStudio


class PredictionPushError(RuntimeError):
    pass


@dataclass(frozen=True)
class PushSummary:
    created: int
    updated: int
    deleted: int
    unchanged: int
    seconds: float

    @property
    def tasks_updated(self) -> int:
        return self.created + self.updated


def task_states(client: LabelStudio, project_id: int) -> dict[int, bool]:
    """Every task of the project → whether it holds an annotation (what /predict calls labelled)."""
    states: dict[int, bool] = {}
    item: Any
    for item in client.tasks.list(project=project_id, fields="all", page_size=200):
        states[int(item.id)] = bool(item.annotations)
    return states


def _same(existing: Any, body: Mapping[str, Any]) -> bool:
    score = existing.score
    return (existing.model_version == body["model_version"] and existing.result == body["result"]
            and score is not None and abs(float(score) - float(body["score"])) <= 1e-9)


def _plan(client: LabelStudio, project_id: int, bodies: Mapping[int, Mapping[str, Any]],
          ours: Callable[[str | None], bool]) -> tuple[list[tuple[str, Callable[[], Any]]], int]:
    """The requests that bring the project's predictions of ours to `bodies`; and how many tasks need none."""
    mine: dict[int, list[Any]] = defaultdict(list)
    for existing in client.predictions.list(project=project_id):
        if existing.task in bodies and existing.id is not None and ours(existing.model_version):
            mine[int(existing.task)].append(existing)
    requests: list[tuple[str, Callable[[], Any]]] = []
    unchanged = 0
    for task_id, body in bodies.items():
        held = sorted(mine.get(task_id, []), key=lambda p: int(p.id))
        fields = {"result": list(body["result"]), "score": float(body["score"]),
                  "model_version": str(body["model_version"])}
        if not held:
            requests.append(("created", partial(client.predictions.create, task=task_id, project=project_id, **fields)))
        elif _same(held[0], body):
            unchanged += 1
        else:
            requests.append(("updated", partial(client.predictions.update, int(held[0].id), **fields)))
        requests.extend(("deleted", partial(client.predictions.delete, int(p.id))) for p in held[1:])
    return requests, unchanged


def push_predictions(
    client: LabelStudio, project_id: int, bodies: Mapping[int, Mapping[str, Any]],
    ours: Callable[[str | None], bool], model_version: str, timeout_s: float = 120.0, workers: int = 4,
) -> PushSummary:
    """Make each task's prediction of ours (`ours(model_version)`) the one in `bodies` (task id → {result,
    score, model_version}), `workers` requests at a time, all within `timeout_s`; then select
    `model_version` for the project. Raises PredictionPushError with what failed."""
    started = time.perf_counter()
    try:
        requests, unchanged = _plan(client, project_id, bodies, ours)
    except Exception as exc:
        raise PredictionPushError(f"could not list project {project_id}'s predictions: {exc}") from exc
    counts = {"created": 0, "updated": 0, "deleted": 0}
    if requests:
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ls-predictions")
        futures: dict[Future[Any], str] = {pool.submit(call): kind for kind, call in requests}
        done, pending = wait(futures, timeout=timeout_s, return_when=FIRST_EXCEPTION)
        pool.shutdown(wait=False, cancel_futures=True)
        failed = [f for f in done if f.exception() is not None]
        if failed:
            raise PredictionPushError(f"{len(failed)} of {len(requests)} prediction requests to project "
                                      f"{project_id} failed; the first: {failed[0].exception()}")
        if pending:
            raise PredictionPushError(f"{len(pending)} of {len(requests)} prediction requests to project "
                                      f"{project_id} unanswered after {timeout_s:.0f} s")
        for future in done:
            counts[futures[future]] += 1
    if bodies:
        try:
            if client.projects.get(project_id).model_version != model_version:
                client.projects.update(project_id, model_version=model_version)
        except Exception as exc:
            raise PredictionPushError(f"could not select model version {model_version!r} for project "
                                      f"{project_id}: {exc}") from exc
    return PushSummary(**counts, unchanged=unchanged, seconds=time.perf_counter() - started)
