"""The write path of the label store: idempotent upserts keyed by event id, under the event contract's ordering rule.

Kept apart from the tables and readers (ingest/store.py) so the one rule every writer must follow reads as one unit.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from ground.moments import as_utc, utcnow
from ground.schemas import ExpertLabel, ProxyPreference
from ground.schemas.events import LABELSTUDIO_SOURCE
from ingest.store import Base, LabelHistoryRow, LabelKind, LabelRow

# The tables themselves, for Core bulk inserts.
_LABELS = Base.metadata.tables[LabelRow.__tablename__]
_HISTORY = Base.metadata.tables[LabelHistoryRow.__tablename__]


def _row_values(event: ExpertLabel | ProxyPreference) -> tuple[LabelKind, str]:
    if isinstance(event, ExpertLabel):
        return "expert", event.annotator_id
    return "proxy", event.proxy_name


def _source(event: ExpertLabel | ProxyPreference) -> str | None:
    """What a row records as the label's source: an expert label's when it names more than the contract's default
    (a Label Studio project); None when it names none, so it never erases one a row records."""
    return event.source if isinstance(event, ExpertLabel) and event.source != LABELSTUDIO_SOURCE else None


def _kept_source(stored: str | None, new: str | None, supersedes: bool) -> str | None:
    """A row's source after an event: the newer version's when it names one; else the stored one, filled in by any
    version that names one (an annotation belongs to one project, whichever version says so). Never erased: a
    retraction may not know the project, and reconciliation sweeps only labels recorded as its project's."""
    return (new or stored) if supersedes else (stored or new)


class KindConflict(ValueError):
    """An event of one kind (expert, proxy) for an id stored, or earlier in the batch, as the other kind.

    Refused rather than applied: the row would keep its kind and take the other kind's item, so a proxy
    source could rewrite (or resurrect) an expert label by reusing its id. The consumer dead-letters it.
    """

    def __init__(self, event_id: str, stored: str, new: str) -> None:
        super().__init__(f"event id {event_id[:256]!r} is stored with kind {stored}; "
                         f"a {new} event may not change its kind")
        self.event_id = event_id


def _utc(moment: datetime) -> datetime:
    # SQLite keeps no offset: 12:00-05:00 would be stored, and compared, as 12:00. Stored times are UTC.
    return as_utc(moment).astimezone(UTC)


_IN_CHUNK = 500  # ids per IN (...) query; far below SQLite's and PostgreSQL's parameter limits


def upsert_events(session: Session, events: Iterable[ExpertLabel | ProxyPreference]) -> int:
    """Insert or update by event id; repeating a delivery changes nothing. Returns rows written.

    The rule of the event contract (v2): an identical copy (same content, whatever its `occurred_at`)
    is a no-op; between different versions of one id the later `occurred_at` wins, and equal moments
    are ordered by content hash, so the stored version never depends on arrival order or on any
    reader's clock. `action="deleted"` retracts. Each write is appended to `label_history`. The
    caller commits: Kafka offsets are committed only after that. Times are stored in UTC. The source
    (`_kept_source`) is no part of a version: a copy that only adds it is still a copy.

    Raises KindConflict, before writing anything, when an event's kind differs from its id's stored
    (or earlier in the batch) kind.
    """
    batch = list(events)
    existing: dict[str, LabelRow] = {}
    ids = sorted({e.event_id for e in batch})
    for i in range(0, len(ids), _IN_CHUNK):
        rows = session.scalars(select(LabelRow).where(LabelRow.event_id.in_(ids[i:i + _IN_CHUNK])))
        existing.update({row.event_id: row for row in rows})
    kinds = {event_id: row.kind for event_id, row in existing.items()}
    for event in batch:
        kind = _row_values(event)[0]
        if kinds.setdefault(event.event_id, kind) != kind:
            raise KindConflict(event.event_id, kinds[event.event_id], kind)
    # New rows and history are bulk-inserted with Core statements on the tables (the ORM's bulk
    # insert still collects per-row commands: most of the cost); rows that already exist are
    # updated through the ORM.
    inserts: dict[str, dict[str, Any]] = {}
    history: list[dict[str, Any]] = []
    next_seq = (session.scalar(select(func.max(LabelRow.seq))) or 0) + 1
    for event in batch:
        kind, source_id = _row_values(event)
        source = _source(event)
        row = existing.get(event.event_id)
        fresh = inserts.get(event.event_id)
        if isinstance(event, ExpertLabel):
            action = event.action
        else:
            action = "created" if row is None and fresh is None else "updated"
        item = event.item.model_dump(mode="json") if event.item is not None else None
        deleted, occurred_at = action == "deleted", _utc(event.occurred_at)
        version = _Version(occurred_at, source_id, item, deleted)
        if row is None and fresh is None:
            # A retraction that overtook its creation leaves a tombstone, so the late creation
            # (older occurred_at) cannot resurrect the label.
            inserts[event.event_id] = {
                "event_id": event.event_id, "kind": kind, "source_id": source_id, "item": item or {},
                "deleted": deleted, "occurred_at": occurred_at, "seq": next_seq, "stored_at": utcnow(),
                "source": source,
            }
            next_seq += 1
        elif fresh is not None:
            newer = version.supersedes(_Version(fresh["occurred_at"], fresh["source_id"], fresh["item"],
                                                fresh["deleted"]))
            fresh["source"] = _kept_source(fresh["source"], source, newer)
            if not newer:
                continue
            fresh.update(deleted=deleted, occurred_at=occurred_at, source_id=source_id,
                         **({"item": item} if item else {}))
        elif row is not None:
            newer = version.supersedes(_Version(_utc(row.occurred_at), row.source_id, row.item, row.deleted))
            row.source = _kept_source(row.source, source, newer)
            if not newer:
                continue
            row.deleted, row.occurred_at, row.source_id = deleted, occurred_at, source_id
            if item is not None:
                row.item = item
        history.append({"event_id": event.event_id, "kind": kind, "action": action, "item": item,
                        "occurred_at": occurred_at, "recorded_at": utcnow()})
    if inserts:
        session.execute(insert(_LABELS), list(inserts.values()))
    if history:
        session.execute(insert(_HISTORY), history)
    session.flush()
    return len(history)


@dataclass(frozen=True)
class _Version:
    """One version of a label, as the ordering rule of upsert_events sees it."""

    occurred_at: datetime
    source_id: str
    item: dict[str, object] | None
    deleted: bool

    def content_hash(self) -> str:
        # A retraction's content is the retraction itself: who sent it does not make it another version.
        content = ["deleted"] if self.deleted else [self.source_id, self.item]
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def supersedes(self, stored: _Version) -> bool:
        mine, theirs = self.content_hash(), stored.content_hash()
        # An identical copy (a redelivery, a replay) is no newer whatever its timestamp.
        return mine != theirs and (self.occurred_at, mine) > (stored.occurred_at, theirs)
