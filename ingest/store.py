"""Where validated events live: the tables, their readers and content-hashed snapshots (writes: ingest/upsert.py).

SQLite by default, any SQLAlchemy URL (PostgreSQL) by `PROXYLOOP_STORE_URL`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any, Literal, TypeVar

from pydantic import TypeAdapter, ValidationError
from sqlalchemy import JSON, Boolean, DateTime, Integer, String, case, create_engine, func, select
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_fixed

from ground.moments import utcnow
from ground.schemas import (
    FeatureTriple,
    Item,
    PairwiseText,
    RetrainRunRecord,
)

LabelKind = Literal["expert", "proxy"]
_item_adapter: TypeAdapter[Item] = TypeAdapter(Item)
ItemT = TypeVar("ItemT", FeatureTriple, PairwiseText)  # the kinds of item an expert label carries


class Base(DeclarativeBase):
    pass


class LabelRow(Base):
    __tablename__ = "labels"
    event_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), index=True)
    source_id: Mapped[str] = mapped_column(String(256))
    item: Mapped[dict[str, object]] = mapped_column(JSON)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    stored_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    seq: Mapped[int] = mapped_column(Integer, index=True)
    # An expert label's `source` when it names more than the contract's default (a Label Studio project,
    # "labelstudio/project-3"; the demo's "labelstudio/simulated"): reconciliation sweeps only its own project's
    # labels. NULL: named none, a proxy preference (its source is source_id), or stored before revision 0003.
    source: Mapped[str | None] = mapped_column(String(256), nullable=True)


class LabelHistoryRow(Base):
    """Every write to `labels`, in order: creations, updates and retractions are never lost."""

    __tablename__ = "label_history"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(256), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(16))
    item: Mapped[dict[str, object] | None] = mapped_column(JSON, nullable=True)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LabelStudioSync(Base):
    """Reconciliation state per Label Studio project: annotations changed at or after `watermark` are re-read."""

    __tablename__ = "labelstudio_sync"
    project_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    watermark: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class SnapshotRow(Base):
    __tablename__ = "snapshots"
    snapshot_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    n_expert: Mapped[int] = mapped_column(Integer)
    n_proxy: Mapped[int] = mapped_column(Integer)
    event_ids: Mapped[list[str]] = mapped_column(JSON)


class NewLabelCursor(Base):
    """Labels counted toward the next threshold crossing: rows with a higher `seq` are not counted yet.

    So each check counts only the rows added since the last one (the seq index), not the whole table:
    counting the table after every batch slowed ingest as the store grew. Retractions are not new
    labels and do not count. With several consumers on PostgreSQL, seq values of concurrent batches
    may interleave and a few rows be counted late; the totals an emission reports are exact.
    """

    __tablename__ = "new_label_cursor"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(Integer)
    expert_new: Mapped[int] = mapped_column(Integer)
    proxy_new: Mapped[int] = mapped_column(Integer)


class RetrainRun(Base):
    """What proxyloop keeps of a retrain beyond Prefect's run states: its `RetrainRunRecord` (snapshot,
    condition report, training, evaluation, gate decision, release: the lineage a release and an
    override need), and a coarse stage marker that `proxyloop runs` and the demo read without Prefect.
    Prefect's flow-run state stays the authority on whether the run is running, failed or done."""

    __tablename__ = "retrain_runs"
    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(32))
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


@lru_cache(maxsize=8)
def make_engine(url: str) -> Engine:
    """One engine per URL and process; upgrades the store's schema to the newest migration
    (ingest/migrations), so an upgraded proxyloop keeps the data of the old one."""
    from ingest.migrations import upgrade
    # pre_ping: after a database restart the pool's old connections are replaced, not handed out.
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        sa_event.listen(engine, "connect", _sqlite_wal)
    # Processes starting together race to migrate; the loser sees the tables appear (or its version
    # row collide) and, tried again, finds the store at the newest revision.
    Retrying(retry=retry_if_exception_type((OperationalError, ProgrammingError, IntegrityError)),
             stop=stop_after_attempt(5), wait=wait_fixed(0.5), reraise=True)(upgrade, engine)
    return engine


def _sqlite_wal(dbapi_connection: Any, _record: object) -> None:
    # WAL: a commit appends to the log and syncs it once, where the rollback journal syncs the
    # journal and the database file (half the ingest's commit time), and readers in other processes
    # no longer block the writer. synchronous stays FULL, so a committed batch survives a power loss
    # too: the consumer commits its Kafka offsets right after. (NORMAL would skip that sync and
    # could lose the last batches on power loss, offsets already committed.) Needs a local file
    # system (shared memory); `sqlite://` in memory answers "memory" and is unaffected.
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
    finally:
        cursor.close()


def label_history(session: Session, event_id: str) -> Sequence[LabelHistoryRow]:
    """Every stored version of one label, oldest first."""
    return session.scalars(
        select(LabelHistoryRow).where(LabelHistoryRow.event_id == event_id).order_by(LabelHistoryRow.id)
    ).all()


def live_event_sources(session: Session, prefix: str) -> dict[str, str | None]:
    """The stored, not retracted expert labels whose event id starts with `prefix`: event id → recorded source. Expert
    only: Label Studio's labels are annotators', and a proxy preference a client sent under the prefix is not one a
    reconciliation may retract."""
    rows = session.execute(
        select(LabelRow.event_id, LabelRow.source).where(LabelRow.event_id.startswith(prefix),
                                                         LabelRow.kind == "expert", LabelRow.deleted.is_(False))
    )
    return {event_id: source for event_id, source in rows}


def live_expert_items(session: Session, kind: type[ItemT]) -> list[ItemT]:
    """The items of one kind (feature triples or text pairs) of the stored, not retracted expert labels, in
    event-id order: the acquisition's labelled set."""
    rows = session.scalars(select(LabelRow.item).where(LabelRow.kind == "expert", LabelRow.deleted.is_(False))
                           .order_by(LabelRow.event_id))
    items = [_item_adapter.validate_python(item) for item in rows if item]
    return [item for item in items if isinstance(item, kind)]


def count_labels(session: Session) -> dict[str, int]:
    rows = session.execute(
        select(LabelRow.kind, func.count()).where(LabelRow.deleted.is_(False)).group_by(LabelRow.kind)
    ).all()
    counts = {"expert": 0, "proxy": 0}
    counts.update({kind: n for kind, n in rows})
    return counts


def freeze_snapshot(session: Session) -> SnapshotRow:
    """An immutable selection of the live rows; its id is the hash of their content."""
    rows = session.scalars(select(LabelRow).where(LabelRow.deleted.is_(False)).order_by(LabelRow.event_id)).all()
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps([row.event_id, row.kind, row.item], sort_keys=True).encode())
    snapshot_id = digest.hexdigest()[:32]
    existing = session.get(SnapshotRow, snapshot_id)
    if existing is not None:
        return existing
    snapshot = SnapshotRow(
        snapshot_id=snapshot_id,
        n_expert=sum(r.kind == "expert" for r in rows),
        n_proxy=sum(r.kind == "proxy" for r in rows),
        event_ids=[r.event_id for r in rows],
    )
    session.add(snapshot)
    session.flush()
    return snapshot


class SnapshotNotFound(LookupError):
    pass


def _stored_item(event_id: str, item: dict[str, object]) -> Item:
    """A stored item read back; one stored under an older, looser contract is named, not just refused."""
    try:
        return _item_adapter.validate_python(item)
    except ValidationError as exc:
        raise ValueError(f"stored label {event_id!r} no longer matches the event contract: {exc}") from exc


def load_snapshot_triples(session: Session, snapshot_id: str) -> dict[LabelKind, list[FeatureTriple]]:
    """The feature triples of a snapshot, split by kind, in event-id order (deterministic).

    Raises MixedDimensions when the triples' x lengths differ (stored before the consumer refused
    that): every stage after this one would fail with errors that name no event.
    """
    snapshot = session.get(SnapshotRow, snapshot_id)
    if snapshot is None:
        raise SnapshotNotFound(f"snapshot {snapshot_id!r} not in the store; freeze one first")
    wanted = set(snapshot.event_ids)
    out: dict[LabelKind, list[FeatureTriple]] = {"expert": [], "proxy": []}
    ids_by_dimension: dict[int, list[str]] = {}
    for row in session.scalars(select(LabelRow).order_by(LabelRow.event_id)):
        if row.event_id in wanted:
            item = _stored_item(row.event_id, row.item)
            if isinstance(item, FeatureTriple):
                out["expert" if row.kind == "expert" else "proxy"].append(item)
                ids_by_dimension.setdefault(len(item.x), []).append(row.event_id)
    if len(ids_by_dimension) > 1:
        raise MixedDimensions(snapshot_id, ids_by_dimension)
    return out


class MixedDimensions(ValueError):
    """A snapshot whose feature triples do not all have one x length; names the odd events."""

    def __init__(self, snapshot_id: str, ids_by_dimension: dict[int, list[str]]) -> None:
        common, *others = sorted(ids_by_dimension, key=lambda d: (-len(ids_by_dimension[d]), d))
        odd = [f"{event_id} (x of {d})" for d in others for event_id in ids_by_dimension[d]]
        counts = ", ".join(f"{len(ids)} of dimension {d}" for d, ids in sorted(ids_by_dimension.items()))
        super().__init__(f"snapshot {snapshot_id} mixes feature dimensions ({counts}); most have x of length "
                         f"{common}, these do not: {', '.join(odd[:20])}{' …' if len(odd) > 20 else ''}. "
                         "Retract them (or re-send them at that dimension) and freeze a new snapshot")
        self.dimensions = sorted(ids_by_dimension)


def feature_dimension(session: Session) -> int | None:
    """The x length of the oldest live feature label, None without any: the dimension the consumer holds
    new feature events to (ingest.consumer), so a stray one cannot break every later retrain."""
    item = session.scalar(select(LabelRow.item).where(LabelRow.deleted.is_(False),
                                                      LabelRow.item["type"].as_string() == "features")
                          .order_by(LabelRow.seq).limit(1))
    x = item.get("x") if item else None
    return len(x) if isinstance(x, list) else None


def count_new_labels(session: Session) -> NewLabelCursor:
    """Advance the cursor over rows added since the last call; returns it with the running counts."""
    cursor = session.get(NewLabelCursor, 1)
    if cursor is None:
        cursor = NewLabelCursor(id=1, seq=0, expert_new=0, proxy_new=0)
        session.add(cursor)
    live = func.sum(case((LabelRow.deleted.is_(False), 1), else_=0))  # a tombstone is no new label
    rows = session.execute(select(LabelRow.kind, live, func.max(LabelRow.seq))
                           .where(LabelRow.seq > cursor.seq).group_by(LabelRow.kind)).all()
    for kind, n, _ in rows:
        if kind == "expert":
            cursor.expert_new += n
        else:
            cursor.proxy_new += n
    cursor.seq = max([cursor.seq, *(top for _, _, top in rows)])
    session.flush()
    return cursor


def record_run(session: Session, record: RetrainRunRecord, status: str) -> None:
    summary = json.loads(record.model_dump_json())  # JSON proper: PostgreSQL refuses a NaN token ("NaN" strings)
    run = session.get(RetrainRun, record.run_id)
    if run is None:
        session.add(RetrainRun(run_id=record.run_id, status=status, summary=summary))
    else:
        run.status, run.summary = status, summary
    session.flush()


def run_record(run: RetrainRun) -> RetrainRunRecord:
    return RetrainRunRecord.model_validate(run.summary)


def latest_runs(session: Session, limit: int = 5) -> Sequence[RetrainRun]:
    return session.scalars(select(RetrainRun).order_by(RetrainRun.updated_at.desc()).limit(limit)).all()


HELDOUT_EVERY = 3


def split_by_group(items: Sequence[ItemT], groups: Sequence[int]) -> tuple[list[ItemT], list[ItemT]]:
    """(train, held-out): every third group (numbered by first appearance) held out, with every item in it.

    Deterministic so the training task and the evaluation task agree without passing data. Groups are copies of one
    task (an input, a text pair): two annotators labelling one task give it twice, and a held-out copy of a training
    item scored the gate on what was trained on. With every item its own group, every third item, as before.
    """
    return ([t for g, t in zip(groups, items, strict=True) if g % HELDOUT_EVERY != 0],
            [t for g, t in zip(groups, items, strict=True) if g % HELDOUT_EVERY == 0])


def split_expert(triples: Sequence[FeatureTriple]) -> tuple[list[FeatureTriple], list[FeatureTriple]]:
    """`split_by_group` of expert triples by input, as the condition tests' folds group them
    (`condition_statistics.grouped_folds`)."""
    seen: dict[tuple[float, ...], int] = {}
    return split_by_group(triples, [seen.setdefault(tuple(t.x), len(seen)) for t in triples])
