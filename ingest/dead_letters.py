"""Dead letters: a letter that always fits the topic, a store row per refused record, and its payload kept.

Why a row in the store beside the topic: the row says a record at (topic, partition, offset) has been
dead-lettered, so a batch read again (a broker error, a restart) never dead-letters it twice, and
operators count and replay letters without reading the whole topic. A payload too large to ride in
its letter is kept under `Settings.dead_letter_payload_url` (any fsspec URL), named by its SHA-256.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property

import fsspec
from kafka import KafkaProducer
from sqlalchemy import DateTime, Integer, LargeBinary, String, Text, func, select, tuple_
from sqlalchemy.orm import Mapped, Session, mapped_column

from ground.moments import utcnow
from ground.schemas import DeadLetter, DeadLetterReason
from ground.settings import Settings
from ingest.store import Base


class DeadLetterRow(Base):
    """One refused record. Keyed by position and content hash: a topic re-created with the same name
    starts its offsets again, and its new records must not pass for old ones."""

    __tablename__ = "dead_letters"
    topic: Mapped[str] = mapped_column(String(256), primary_key=True)
    partition: Mapped[int] = mapped_column(Integer, primary_key=True)
    offset: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    reason_code: Mapped[str] = mapped_column(String(32), index=True)
    reason: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(Integer)
    key: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    payload: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # when small enough to keep here
    payload_uri: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    dead_lettered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    replayed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    replays: Mapped[int] = mapped_column(Integer, default=0)


Position = tuple[str, int, int, str]  # topic, partition, offset, sha256


@dataclass(frozen=True)
class Refusal:
    """A record the consumer will not store, with why."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    raw: bytes | None
    reason: str
    code: DeadLetterReason

    @cached_property  # a refused record may be megabytes; its position, letter and row all use the hash
    def sha256(self) -> str:
        return hashlib.sha256(self.raw or b"").hexdigest()

    @property
    def position(self) -> Position:
        return self.topic, self.partition, self.offset, self.sha256


class PayloadMissing(LookupError):
    """A kept payload is gone or no longer matches its hash."""


def payload_uri(settings: Settings, sha256: str) -> str:
    return f"{settings.resolved_dead_letter_payload_url.rstrip('/')}/{sha256}.bin"


def keep_payload(settings: Settings, raw: bytes, sha256: str) -> str:
    """Write the whole payload where letters point (idempotent: the name is its hash, `sha256`)."""
    uri = payload_uri(settings, sha256)
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "wb") as out:
            out.write(raw)
    return uri


def load_payload(uri: str, sha256: str) -> bytes:
    try:
        with fsspec.open(uri, "rb") as handle:
            raw: bytes = handle.read()
    except FileNotFoundError as exc:
        raise PayloadMissing(f"dead-letter payload {uri} is gone") from exc
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise PayloadMissing(f"dead-letter payload {uri} does not match its SHA-256 {sha256}")
    return raw


# Of a record key, a letter carries at most this much: a key is not size-checked by producers apart from the record,
# and a letter larger than the topic accepts would be refused for ever, its batch read again and again.
KEY_INLINE_BYTES = 4096


def letter_for(settings: Settings, refusal: Refusal) -> DeadLetter:
    """The letter sent to the dead-letter topic; never larger than the topic accepts (see Settings)."""
    raw, key = refusal.raw or b"", refusal.key
    inline = len(raw) <= settings.dead_letter_inline_bytes
    return DeadLetter(
        reason=refusal.reason, reason_code=refusal.code, topic=refusal.topic, partition=refusal.partition,
        offset=refusal.offset, key_b64=None if key is None else base64.b64encode(key[:KEY_INLINE_BYTES]).decode(),
        key_size=None if key is None else len(key), size=len(raw), sha256=refusal.sha256,
        original_b64=base64.b64encode(raw[: settings.dead_letter_inline_bytes]).decode(),
        truncated=not inline, payload_uri=None if inline else keep_payload(settings, raw, refusal.sha256),
    )


def already_dead_lettered(session: Session, refusals: Sequence[Refusal]) -> set[Position]:
    """Which of these refusals have a letter already (read again after a broker error or a restart)."""
    columns = (DeadLetterRow.topic, DeadLetterRow.partition, DeadLetterRow.offset, DeadLetterRow.sha256)
    found: set[Position] = set()
    for i in range(0, len(refusals), 500):  # far below SQLite's and PostgreSQL's parameter limits
        wanted = [r.position for r in refusals[i:i + 500]]
        rows = session.execute(select(*columns).where(tuple_(*columns).in_(wanted)))
        found.update((topic, partition, offset, sha) for topic, partition, offset, sha in rows)
    return found


def record(session: Session, letters: Iterable[tuple[Refusal, DeadLetter]]) -> None:
    """Rows for letters the broker acknowledged; the caller commits."""
    for refusal, letter in letters:
        raw = refusal.raw or b""
        session.merge(DeadLetterRow(
            topic=refusal.topic, partition=refusal.partition, offset=refusal.offset, sha256=letter.sha256,
            reason_code=refusal.code, reason=refusal.reason, size=len(raw), key=refusal.key,
            payload=None if letter.truncated else raw, payload_uri=letter.payload_uri,
            dead_lettered_at=letter.dead_lettered_at, replays=0,
        ))


def count_by_reason(session: Session) -> dict[str, int]:
    rows = session.execute(select(DeadLetterRow.reason_code, func.count()).group_by(DeadLetterRow.reason_code))
    return {code: int(n) for code, n in rows}


def find(session: Session, reason: str | None = None, since: datetime | None = None,
         replayed: bool | None = None) -> Sequence[DeadLetterRow]:
    """Dead letters oldest first, filtered by reason code, time, and whether they were replayed."""
    query = select(DeadLetterRow).order_by(DeadLetterRow.dead_lettered_at, DeadLetterRow.topic,
                                           DeadLetterRow.partition, DeadLetterRow.offset)
    if reason is not None:
        query = query.where(DeadLetterRow.reason_code == reason)
    if since is not None:
        query = query.where(DeadLetterRow.dead_lettered_at >= since)
    if replayed is not None:
        query = query.where(DeadLetterRow.replayed_at.is_not(None) if replayed else DeadLetterRow.replayed_at.is_(None))
    return session.scalars(query).all()


def original_bytes(row: DeadLetterRow) -> bytes:
    """The refused record's value, from the store or from where it was kept."""
    if row.payload_uri is None:
        return row.payload or b""
    return load_payload(row.payload_uri, row.sha256)


@dataclass(frozen=True)
class Replayed:
    topic: str
    partition: int
    offset: int
    reason_code: str


def replay(session: Session, producer: KafkaProducer, rows: Sequence[DeadLetterRow]) -> list[Replayed]:
    """Publish each refused record again, as it was (same key, same bytes), to the topic it came from.

    Meant for after a fix (a contract change, a raised limit): what now passes is stored, what does not
    is dead-lettered again under its new position. Safe to repeat: the store treats an identical copy
    as a no-op. Rows are marked replayed as soon as the broker acknowledged them (the caller commits).
    """
    futures = [(row, producer.send(row.topic, key=row.key, value=original_bytes(row))) for row in rows]
    producer.flush()
    done = []
    for row, future in futures:
        future.get(timeout=30)
        row.replayed_at, row.replays = utcnow(), row.replays + 1
        done.append(Replayed(row.topic, row.partition, row.offset, row.reason_code))
    session.flush()
    return done
