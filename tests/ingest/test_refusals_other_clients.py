"""What producers other than ours send that the contract alone does not catch: an empty value, a Schema Registry frame,
a clock hours ahead, a key too large to ride in a letter (store_batch on SQLite, as tests/ingest/test_refusals.py)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from ground.settings import Settings
from ingest.bus import MalformedEvent, decode_label_event
from ingest.store import make_engine
from tests.ingest.test_refusals import _Batch, _codes, _event, _features, _raw, _run


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path, store_url=f"sqlite:///{tmp_path}/store.db")


def test_an_empty_value_and_a_schema_registry_frame_are_named_as_such() -> None:
    with pytest.raises(MalformedEvent, match=r"empty record value \(0 bytes\)") as empty:
        decode_label_event(b"")
    assert empty.value.code == "empty"
    framed = b"\x00" + (42).to_bytes(4, "big") + _raw(_event("framed"))
    with pytest.raises(MalformedEvent, match="Confluent Schema Registry framing .*schema id 42.*plain UTF-8 JSON"):
        decode_label_event(framed)


def test_an_event_from_a_clock_hours_ahead_is_dead_lettered_and_does_not_outrank_a_correction(
        settings: Settings) -> None:
    """Kept, an occurred_at in 9999 would win over every later version of its id, silently."""
    batch, now = _Batch(settings), datetime.now(UTC)
    ahead = _event("skew", kind="expert", occurred_at="9999-12-31T00:00:00Z", item=_features(9.0, 9.0))
    near = _event("near", occurred_at=(now + timedelta(minutes=5)).isoformat())  # within the default hour
    correction = _event("skew", kind="expert", occurred_at=now.isoformat(), item=_features(1.0, 1.0))
    letters, rows = _run(settings, batch(ahead, near), batch(correction))
    assert _codes(letters) == {0: "future_occurred_at"} and "PROXYLOOP_MAX_CLOCK_AHEAD_S" in letters[0]["reason"]
    assert sorted(rows) == ["near", "skew"] and rows["skew"].item["x"] == [1.0, 1.0]
    strict = settings.model_copy(update={"max_clock_ahead_s": 60})
    letters, _ = _run(strict, _Batch(strict)(near))
    assert _codes(letters) == {0: "future_occurred_at"}


def test_a_letter_carries_at_most_4_kib_of_the_key_and_the_store_keeps_it_whole(settings: Settings) -> None:
    """An 800 KB key on a bad record made a letter larger than the topic takes: refused, its batch read for ever."""
    from ingest.dead_letters import DeadLetterRow

    big_key = bytes(range(256)) * 3200
    record = SimpleNamespace(topic=settings.topic_proxy, partition=0, offset=0, key=big_key, value=b"not json")
    letters, _ = _run(settings, [record])  # type: ignore[list-item]
    assert letters[0]["key_size"] == len(big_key)
    assert base64.b64decode(letters[0]["key_b64"]) == big_key[:4096]
    with Session(make_engine(settings.resolved_store_url)) as session:
        assert session.scalars(select(DeadLetterRow.key)).one() == big_key
