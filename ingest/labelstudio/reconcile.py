"""Reconciliation: re-read annotations from the Label Studio API so a lost webhook loses nothing.

Run: `proxyloop labelstudio reconcile` (or the `reconcile-labelstudio` Prefect flow in flows/reconcile.py).
Annotations changed at or after the project's stored watermark are published as the same
`ExpertLabel` events the webhook would have sent (same event id, same `occurred_at`), so the
store's idempotent upsert keeps each exactly once. An annotation that holds no preference (a skip,
a cleared choice) is published as its label's retraction, as the webhook does for such an edit: it
cannot tell a new annotation from an edited one, and retracting a label never stored is harmless.
Labels the store records as this project's (their `source`, payloads.project_source) but Label Studio no longer
has are retracted (a deleted task sends no ANNOTATIONS_DELETED); every other label is left alone: another project's,
the demo's simulated ones, and those recording no project (stored before labels recorded it), which are counted and
reported, never looked up: a 404 from this server does not tie them to this project. A project Label Studio no longer
has is refused with nothing retracted (ProjectMissing). The watermark moves only after Kafka acknowledged every event.

A project deleted for real is retracted on purpose: `proxyloop labelstudio retract-project --project ID`
(`retract_project`) retracts the labels recorded as its, and those recording no project that Label Studio answers
404 for, through Kafka alike, once Label Studio answers 404 for the project.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import httpx
from kafka import KafkaProducer
from label_studio_sdk.client import LabelStudio
from label_studio_sdk.core.api_error import ApiError
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from ground.moments import as_utc
from ground.schemas import ExpertLabel
from ground.settings import Settings
from ingest.bus import make_producer, publish
from ingest.labelstudio.payloads import (
    EVENT_ID_PREFIX,
    LSAnnotation,
    LSTask,
    NoLabel,
    UnusableAnnotation,
    annotation_id_of,
    expert_label_from_annotation,
    project_of_source,
    project_source,
    retraction,
    retraction_of,
)
from ingest.labelstudio.provision import LabelStudioSetupError, client_for, find_project
from ingest.store import LabelStudioSync, live_event_sources, make_engine

log = logging.getLogger("proxyloop.labelstudio")

PAGE_SIZE = 500


@dataclass
class ReconcileReport:
    project_id: int
    seen: int = 0
    published: int = 0
    retracted: int = 0
    skipped: list[str] = field(default_factory=list)
    watermark: datetime | None = None
    unknown_project: int = 0  # live Label Studio labels recording no project: left alone, neither looked up nor swept

    @property
    def unknown_note(self) -> str | None:
        """What the operator is told of the labels left alone, None without any."""
        if not self.unknown_project:
            return None
        return (f"{self.unknown_project} live Label Studio labels of unknown project left alone; "
                "`proxyloop labelstudio retract-project --project ID` withdraws them on purpose")


def _aware(moment: datetime | None) -> datetime | None:
    return None if moment is None else as_utc(moment)


def _action(annotation: LSAnnotation) -> Literal["created", "updated"]:
    # Label Studio stamps created_at and updated_at microseconds apart on creation.
    created = getattr(annotation, "created_at", None)
    if isinstance(created, str) and annotation.updated_at is not None:
        created_at = _aware(datetime.fromisoformat(created))
        if created_at is not None and annotation.updated_at - created_at > timedelta(seconds=1):
            return "updated"
    return "created"


def _skip(report: ReconcileReport, reason: str) -> None:
    """One annotation left out; the run goes on (one bad annotation must not stop every run)."""
    log.warning("project %d: skipped %s", report.project_id, reason)
    report.skipped.append(reason)


def _raw_id(raw: object) -> object:
    return raw.get("id") if isinstance(raw, dict) else getattr(raw, "id", None)


def _event(annotation: LSAnnotation, task: LSTask, source: str) -> ExpertLabel:
    """The annotation's label, or its retraction when it holds no preference (NoLabel); raises otherwise."""
    try:
        return expert_label_from_annotation(annotation, task, _action(annotation), source)
    except NoLabel:
        return retraction_of(annotation, source)


def _tasks(client: LabelStudio, project_id: int, page_size: int = PAGE_SIZE) -> Iterable[Any]:
    """The project's tasks with their annotations. The one read that decides whether a project exists: on its 404
    reconcile refuses (ProjectMissing) and retract_project goes ahead, so the two never disagree about a project."""
    return client.tasks.list(project=project_id, fields="all", page_size=page_size)


def _changed_labels(
    client: LabelStudio, project_id: int, since: datetime | None, report: ReconcileReport, adopt: set[int],
) -> tuple[list[ExpertLabel], set[int]]:
    """Events for annotations changed at/after `since`, and for those of `adopt` (labels stored recording no
    project: sent again with this project's, which the store fills in, so the sweep covers them from now on), and
    the ids of every annotation that exists."""
    labels: list[ExpertLabel] = []
    present: set[int] = set()
    source = project_source(project_id)
    task: Any
    for task in _tasks(client, project_id):
        ls_task = LSTask(id=task.id, data=task.data)
        for raw in task.annotations or []:
            try:  # validated here: an annotation Label Studio stores in a shape we cannot read is one skip
                annotation = LSAnnotation.model_validate(raw)
            except ValidationError as exc:
                _skip(report, f"annotation {_raw_id(raw)!r}: unreadable: {exc}")
                continue
            present.add(annotation.id)
            report.seen += 1
            changed = _aware(annotation.updated_at)
            # `>=`: an annotation saved in the same instant as the last run is re-sent, never missed.
            if since is not None and changed is not None and changed < since and annotation.id not in adopt:
                continue
            try:
                labels.append(_event(annotation, ls_task, source))
            except (UnusableAnnotation, ValidationError) as exc:  # the contract's refusals too: skip, do not stop
                _skip(report, f"annotation {annotation.id}: {exc}")
                continue
            if changed is not None and (report.watermark is None or changed > report.watermark):
                report.watermark = changed
    return labels, present


class ProjectMissing(LabelStudioSetupError):
    """Label Studio answers 404 for the project. Nothing is retracted: a deleted project and a Label Studio URL that
    now points at another server (whose annotation ids start again) look alike from here, and retractions stamped
    now would outrank the labels for good. The operator retracts a deleted project's labels on purpose."""


def _project_labels(
    client: LabelStudio, project_id: int, since: datetime | None, report: ReconcileReport, adopt: set[int],
) -> tuple[list[ExpertLabel], set[int]]:
    """_changed_labels; ProjectMissing when Label Studio answers 404 for the project."""
    try:
        return _changed_labels(client, project_id, since, report, adopt)
    except ApiError as exc:
        if exc.status_code != 404:
            raise
        raise ProjectMissing(f"Label Studio answers 404 for project {project_id}: deleted, "
                             "or PROXYLOOP_LABELSTUDIO_URL points at another server; nothing was retracted") from exc


@dataclass(frozen=True)
class LiveLabels:
    """The annotation ids of the store's live Label Studio labels, by the project each records. `unknown`: those
    recording none (stored before labels recorded it, or sent naming none); the simulated ones are in neither."""

    by_project: dict[int, set[int]]
    unknown: set[int]

    def of(self, project_id: int) -> set[int]:
        return self.by_project.get(project_id, set())


def _live_labels(engine: Engine) -> LiveLabels:
    """The store's live Label Studio labels by recorded project: the one read both sweeps are scoped by. One whose
    event id has the prefix but names no annotation (any client may send one) is left out with a warning: it stopped
    every project's reconciliation."""
    with Session(engine) as session:
        sources = live_event_sources(session, EVENT_ID_PREFIX)
    by_project: dict[int, set[int]] = {}
    unknown: set[int] = set()
    for event_id, source in sources.items():
        project_id, annotation_id = project_of_source(source), annotation_id_of(event_id)
        if annotation_id is None:
            log.warning("live label %r (source %r) left out of reconciliation: its event id names no annotation",
                        event_id, source)
        elif project_id is not None:
            by_project.setdefault(project_id, set()).add(annotation_id)
        elif source is None:
            unknown.add(annotation_id)
    return LiveLabels(by_project, unknown)


def _earlier_projects(engine: Engine) -> list[int]:
    """Projects the store has reconciled (a watermark) or holds live labels recorded as."""
    with Session(engine) as session:
        synced = set(session.scalars(select(LabelStudioSync.project_id)))
    return sorted(synced | set(_live_labels(engine).by_project))


def _no_project_titled(settings: Settings, engine: Engine) -> LabelStudioSetupError:
    """Reconcile's refusal when no project has the title. Naming the store's earlier project matters: `setup` makes a
    new one, and before labels recorded their project the new one's reconciliation retracted every old label."""
    where = f"no Label Studio project titled {settings.labelstudio_project_title!r} at {settings.labelstudio_url}"
    earlier = _earlier_projects(engine)
    if not earlier:
        return LabelStudioSetupError(f"{where}; run `proxyloop labelstudio setup` first")
    which = f"project {earlier[0]}" if len(earlier) == 1 else f"projects {', '.join(map(str, earlier))}"
    named = str(earlier[0]) if len(earlier) == 1 else "ID"
    return LabelStudioSetupError(
        f"{where}, yet this store knows {which} (reconciled, or holding its labels); nothing was retracted. If it "
        f"was deleted on purpose, `proxyloop labelstudio retract-project --project {named}` withdraws its labels; "
        "otherwise check that PROXYLOOP_LABELSTUDIO_URL names the Label Studio that has it. (`proxyloop labelstudio "
        f"setup` would make a new project, whose reconciliation leaves {which}'s labels alone.)")


def _vanished(client: LabelStudio, candidates: set[int]) -> list[int]:
    """Those of `candidates` Label Studio answers 404 for (deleted, webhook lost); stops at any other answer, so a
    server that fails half-way has retracted nothing."""
    gone: list[int] = []
    for annotation_id in sorted(candidates):
        try:
            client.annotations.get(annotation_id)  # may belong to another project: then it stays
        except ApiError as exc:
            if exc.status_code == 404:
                gone.append(annotation_id)
            else:
                raise
    return gone


def _publish_all(settings: Settings, producer: KafkaProducer | None, labels: list[ExpertLabel]) -> None:
    """Publish and wait for every ack; raises if the broker did not take one (the watermark then stays put)."""
    own_producer = producer is None
    producer = producer or make_producer(settings)
    try:
        futures = [publish(producer, settings.topic_expert, label, wait=False) for label in labels]
        producer.flush()
        for future in futures:
            future.get(timeout=30)
    finally:
        if own_producer:
            producer.close()


def reconcile(
    settings: Settings, client: LabelStudio | None = None, producer: KafkaProducer | None = None,
    project_id: int | None = None,
) -> ReconcileReport:
    """Publish what changed since the watermark and retract what vanished; returns what it did."""
    client = client or client_for(settings)
    engine = make_engine(settings.resolved_store_url)
    if project_id is None:
        project_id = find_project(client, settings.labelstudio_project_title)
        if project_id is None:  # nothing retracted: see ProjectMissing
            raise _no_project_titled(settings, engine)
    with Session(engine) as session:
        state = session.get(LabelStudioSync, project_id)
        since = _aware(state.watermark) if state else None
    report = ReconcileReport(project_id=project_id, watermark=since)
    live = _live_labels(engine)
    labels, present = _project_labels(client, project_id, since, report, live.unknown)
    labels += [retraction(annotation_id, source=project_source(project_id))
               for annotation_id in _vanished(client, live.of(project_id) - present)]
    report.unknown_project = len(live.unknown - present)  # those this project lists are its own, recorded now
    _publish_all(settings, producer, labels)
    report.published = sum(label.action != "deleted" for label in labels)
    report.retracted = len(labels) - report.published
    with Session(engine) as session:
        state = session.get(LabelStudioSync, project_id) or LabelStudioSync(project_id=project_id)
        state.watermark = report.watermark
        session.add(state)
        session.commit()
    log.info("reconciled project %d: %d annotations seen, %d published, %d retracted, %d skipped",
             project_id, report.seen, report.published, report.retracted, len(report.skipped))
    if report.unknown_note:
        log.warning("project %d: %s", project_id, report.unknown_note)
    return report


class ProjectStillExists(LabelStudioSetupError):
    """retract_project was named a project Label Studio still answers for: its labels are annotators' current work,
    kept in step by the webhook and reconcile. Nothing is retracted."""


@dataclass
class RetractReport:
    project_id: int
    live: int = 0  # the live labels considered: recorded as the project's, or recording no project
    retracted: int = 0  # published as retractions (counted only, on a dry run)
    dry_run: bool = False
    recorded: int = 0  # of `live`, recorded as the project's: all retracted; the rest were looked up, 404s retracted


def _project_exists(client: LabelStudio, settings: Settings, project_id: int) -> bool:
    """Whether Label Studio answers for the project (reconcile's read, one task long). Unreachable is refused, never
    taken as gone: the project's labels go only once Label Studio says it is gone, and only its 404 for each
    annotation tells which labels recording no project were the deleted project's."""
    try:
        next(iter(_tasks(client, project_id, page_size=1)), None)
    except ApiError as exc:
        if exc.status_code != 404:
            raise
        return False
    except httpx.HTTPError as exc:
        raise LabelStudioSetupError(
            f"Label Studio at {settings.labelstudio_url} unreachable (PROXYLOOP_LABELSTUDIO_URL): {exc}; nothing was "
            f"retracted: only Label Studio can tell that project {project_id} is gone, and which labels recording no "
            "project were its") from exc
    return True


def retract_project(
    settings: Settings, project_id: int, dry_run: bool = False, client: LabelStudio | None = None,
    producer: KafkaProducer | None = None,
) -> RetractReport:
    """Retract the labels of a project Label Studio no longer has, the deliberate act ProjectMissing leaves to the
    operator: every live label recorded as the project's, and every one recording no project (stored before labels
    recorded it) whose annotation Label Studio answers 404 for (the project's, or any other deletion whose webhook was
    lost). Other projects' labels and the demo's simulated ones stay. The retractions go through Kafka like
    reconcile's (the consumer is the store's one writer), and only once every lookup answered; a run after the
    consumer stored them finds nothing live to retract."""
    client = client or client_for(settings)
    if _project_exists(client, settings, project_id):
        raise ProjectStillExists(f"Label Studio at {settings.labelstudio_url} still has project {project_id}; nothing "
                                 "was retracted. Its deleted annotations are retracted by `proxyloop labelstudio "
                                 "reconcile`; retract-project is for a project deleted in Label Studio")
    live = _live_labels(make_engine(settings.resolved_store_url))
    recorded = live.of(project_id)
    gone = _vanished(client, live.unknown)
    report = RetractReport(project_id=project_id, live=len(recorded) + len(live.unknown),
                           retracted=len(recorded) + len(gone), dry_run=dry_run, recorded=len(recorded))
    labels = [retraction(annotation_id, source=project_source(project_id)) for annotation_id in sorted(recorded)]
    labels += [retraction(annotation_id) for annotation_id in gone]  # still no project: a 404 does not name one
    if labels and not dry_run:
        _publish_all(settings, producer, labels)
    log.info("project %d gone from Label Studio: %d live labels recorded as its, %d of %d recording no project "
             "without an annotation there, %s", project_id, len(recorded), len(gone), len(live.unknown),
             "dry run, none published" if dry_run else "retracted")
    return report
