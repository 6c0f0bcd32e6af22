"""What the ingest path refuses, and why, without a broker: the contract, the topic a kind belongs to, the id a kind
owns, the store's feature dimension, and a record no check foresaw (each dead-lettered, none stopping the consumer).

`store_batch` runs on a SQLite store with a producer that acknowledges every letter at once.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from kafka.producer.future import FutureProduceResult, FutureRecordMetadata
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from ground.schemas import (
    MAX_OUTPUT_ID,
    MAX_TEXT_CHARS,
    DatasetUpdated,
    ExpertLabel,
    FeatureTriple,
    PairwiseText,
    PolicyReleased,
    ProxyPreference,
)
from ground.settings import Settings
from ingest import consumer as ingest_consumer
from ingest.bus import MalformedEvent, decode_label_event
from ingest.consumer import FeatureDimension, store_batch
from ingest.store import LabelRow, make_engine

WHEN = "2026-11-29T12:00:00Z"


class _Producer:
    """Acknowledges every send at once; keeps the letters."""

    def __init__(self) -> None:
        self.letters: list[dict[str, Any]] = []

    def send(self, topic: str, value: bytes, key: bytes) -> FutureRecordMetadata:
        self.letters.append(json.loads(value))
        future = FutureRecordMetadata(FutureProduceResult(None), 0, -1, None, 0, len(value), -1)
        future.success(None)
        return future

    def flush(self) -> None:
        pass


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path, store_url=f"sqlite:///{tmp_path}/store.db")


def _event(event_id: str, kind: str = "proxy", occurred_at: str = WHEN, item: dict[str, Any] | None = None,
           **extra: Any) -> dict[str, Any]:
    event = {"schema_version": 2, "event_id": event_id, "occurred_at": occurred_at,
             "item": item if item is not None else {"type": "features", "x": [0.5, 1.0], "y_w": 0, "y_l": 1}}
    event.update({"kind": "proxy_preference", "proxy_name": "judge"} if kind == "proxy"
                 else {"kind": "expert_label", "annotator_id": "ann"})
    return {**event, **extra}


def _features(*x: float) -> dict[str, Any]:
    return {"type": "features", "x": list(x), "y_w": 0, "y_l": 1}


def _raw(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


class _Batch:
    """Records for store_batch on the topic each event's kind belongs to (or the one given), offsets in order."""

    def __init__(self, settings: Settings) -> None:
        self.settings, self.offset = settings, 0

    def __call__(self, *values: bytes | dict[str, Any], topic: str | None = None) -> list[SimpleNamespace]:
        records = []
        for value in values:
            raw = value if isinstance(value, bytes) else _raw(value)
            if topic is None and isinstance(value, dict):
                on = self.settings.topic_expert if value.get("kind") == "expert_label" else self.settings.topic_proxy
            else:
                on = topic or self.settings.topic_proxy
            records.append(SimpleNamespace(topic=on, partition=0, offset=self.offset, key=b"k", value=raw))
            self.offset += 1
        return records


def _run(settings: Settings, *batches: list[SimpleNamespace], dimension: FeatureDimension | None = None
         ) -> tuple[list[dict[str, Any]], dict[str, LabelRow]]:
    """Store the batches in order; returns the letters sent and the stored rows by id."""
    engine, producer = make_engine(settings.resolved_store_url), _Producer()
    for records in batches:
        store_batch(engine, producer, settings, records, dimension)  # type: ignore[arg-type]
    with Session(engine) as session:
        rows = {row.event_id: row for row in session.scalars(select(LabelRow))}
        session.expunge_all()
    return producer.letters, rows


def _codes(letters: list[dict[str, Any]]) -> dict[int, str]:
    return {letter["offset"]: letter["reason_code"] for letter in letters}


# --- 1. a record no check foresaw ------------------------------------------------------------------------------

def test_an_integer_literal_past_python_s_4300_digits_is_not_json_this_reader_accepts() -> None:
    raw = _raw(_event("big")).replace(b'"y_w": 0', b'"y_w": ' + b"1" * 5000)
    with pytest.raises(MalformedEvent, match="4300 digits") as refused:
        decode_label_event(raw)
    assert refused.value.code == "not_json"


def test_the_huge_integer_is_dead_lettered_and_the_records_around_it_stored(settings: Settings) -> None:
    batch = _Batch(settings)
    bad = _raw(_event("big")).replace(b'"y_w": 0', b'"y_w": ' + b"1" * 5000)
    letters, rows = _run(settings, batch(_event("before"), bad, _event("after")))
    assert _codes(letters) == {1: "not_json"} and sorted(rows) == ["after", "before"]


def test_an_unforeseen_failure_decoding_one_record_dead_letters_that_record(
    settings: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = ingest_consumer.decode_label_event

    def decode(raw: bytes | None, max_bytes: int) -> Any:
        if raw is not None and b'"cursed"' in raw:
            raise KeyError("a bug in a decoder")
        return real(raw, max_bytes)

    monkeypatch.setattr(ingest_consumer, "decode_label_event", decode)
    batch = _Batch(settings)
    letters, rows = _run(settings, batch(_event("before"), _event("cursed"), _event("after")))
    assert _codes(letters) == {1: "undecodable"} and sorted(rows) == ["after", "before"]
    assert "KeyError" in letters[0]["reason"] and "a bug in a decoder" in letters[0]["reason"]


def test_a_store_that_cannot_be_reached_still_raises(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(*_: object) -> None:
        raise OperationalError("SELECT 1", {}, ConnectionRefusedError("store down"))

    batch = _Batch(settings)
    monkeypatch.setattr(ingest_consumer, "feature_dimension", unreachable)
    with pytest.raises(OperationalError):  # the dimension's lookup: the batch is read again, nothing refused
        _run(settings, batch(_event("a")))
    monkeypatch.setattr(ingest_consumer, "_upsert_committed", unreachable)
    with pytest.raises(OperationalError):
        _run(settings, batch(_event("a")), dimension=FeatureDimension(known=2))


# --- 2. times without a zone ---------------------------------------------------------------------------------

def test_an_occurred_at_without_a_zone_is_refused_by_the_contract() -> None:
    with pytest.raises(MalformedEvent, match="occurred_at: Input should have timezone info") as refused:
        decode_label_event(_raw(_event("n", occurred_at="2026-11-30T00:00:00")))
    assert refused.value.code == "contract"
    naive = datetime(2026, 11, 30)
    for build in (lambda: ExpertLabel(event_id="e", annotator_id="a", action="deleted", occurred_at=naive),
                  lambda: ProxyPreference(event_id="p", proxy_name="j", occurred_at=naive,
                                          item=FeatureTriple(x=[1.0], y_w=0, y_l=1)),
                  lambda: DatasetUpdated(event_id="d", occurred_at=naive, expert_total=0, proxy_total=0,
                                         expert_new=0, proxy_new=0),
                  lambda: PolicyReleased(event_id="r", occurred_at=naive, policy="p", version=1, alias="a", uri="u")):
        with pytest.raises(ValidationError, match="timezone"):
            build()


def test_a_time_with_no_utc_moment_is_refused_by_the_contract() -> None:
    for edge in ("0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00"):
        with pytest.raises(MalformedEvent, match="out of range in UTC") as refused:
            decode_label_event(_raw(_event("edge", occurred_at=edge)))
        assert refused.value.code == "contract"


def test_a_naive_version_after_an_aware_one_is_dead_lettered_not_fatal(settings: Settings) -> None:
    batch = _Batch(settings)
    newer = _event("n1", occurred_at="2026-11-30T00:00:00", item=_features(2.0, 2.0))
    letters, rows = _run(settings, batch(_event("n1")), batch(newer, _event("other")))
    assert _codes(letters) == {1: "contract"} and sorted(rows) == ["n1", "other"]
    assert rows["n1"].item["x"] == [0.5, 1.0]


# --- 4. the topic a kind belongs to, the kind an id belongs to -------------------------------------------------

def test_an_event_on_the_topic_of_the_other_kind_is_dead_lettered(settings: Settings) -> None:
    batch = _Batch(settings)
    expert, proxy = _event("smuggled", kind="expert"), _event("stray", kind="proxy")
    no_kind = {key: value for key, value in _event("kindless", kind="expert").items() if key != "kind"}
    letters, rows = _run(settings, batch(expert, no_kind, topic=settings.topic_proxy),
                         batch(proxy, topic=settings.topic_expert), batch(_event("elsewhere"), topic="other-topic"))
    assert _codes(letters) == {0: "wrong_topic", 1: "wrong_topic", 2: "wrong_topic", 3: "wrong_topic"}
    assert rows == {}
    reasons = {letter["offset"]: letter["reason"] for letter in letters}
    assert "expert_label event on topic" in reasons[0] and "carries proxy_preference" in reasons[0]
    assert "carries no label events" in reasons[3]


def test_labels_and_their_retractions_on_their_own_topics_are_stored(settings: Settings) -> None:
    batch = _Batch(settings)
    retraction = {key: value for key, value in _event("e1", kind="expert", occurred_at="2026-11-30T00:00:00Z",
                                                        action="deleted").items() if key != "item"}
    letters, rows = _run(settings, batch(_event("e1", kind="expert"), _event("p1")), batch(retraction))
    assert letters == [] and rows["e1"].deleted and not rows["p1"].deleted


def test_a_proxy_event_reusing_an_expert_label_s_id_is_dead_lettered_and_the_label_kept(settings: Settings) -> None:
    batch = _Batch(settings)
    later = _event("lbl-1", kind="proxy", occurred_at="2026-12-01T00:00:00Z", item=_features(9.0, 9.0))
    in_one_batch = [_event("lbl-2", kind="expert"), _event("lbl-2", occurred_at="2026-12-01T00:00:00Z")]
    letters, rows = _run(settings, batch(_event("lbl-1", kind="expert")), batch(later, _event("fine")),
                         batch(*in_one_batch))
    assert _codes(letters) == {1: "kind_conflict", 4: "kind_conflict"}
    assert "stored with kind expert" in letters[0]["reason"]
    assert (rows["lbl-1"].kind, rows["lbl-1"].source_id, rows["lbl-1"].item["x"]) == ("expert", "ann", [0.5, 1.0])
    assert rows["lbl-2"].kind == "expert" and "fine" in rows


def test_upsert_refuses_a_kind_change_before_writing_anything(settings: Settings) -> None:
    from ingest.upsert import KindConflict, upsert_events

    item = FeatureTriple(x=[1.0], y_w=0, y_l=1)
    with Session(make_engine(settings.resolved_store_url)) as session:
        upsert_events(session, [ExpertLabel(event_id="e", annotator_id="a", item=item)])
        later = datetime.now(UTC) + timedelta(hours=1)
        with pytest.raises(KindConflict, match="'e' is stored with kind expert"):
            upsert_events(session, [ProxyPreference(event_id="new", proxy_name="j", item=item),
                                    ProxyPreference(event_id="e", proxy_name="j", item=item, occurred_at=later)])
        stored = session.get(LabelRow, "e")
        assert session.get(LabelRow, "new") is None and stored is not None and stored.kind == "expert"


# --- 5. output ids -----------------------------------------------------------------------------------------------

def test_output_ids_have_an_upper_bound() -> None:
    FeatureTriple(x=[1.0], y_w=MAX_OUTPUT_ID, y_l=0)
    with pytest.raises(ValidationError, match="less than or equal to 4095"):
        FeatureTriple(x=[1.0], y_w=0, y_l=MAX_OUTPUT_ID + 1)
    with pytest.raises(MalformedEvent, match="y_w: Input should be less than or equal") as refused:
        decode_label_event(_raw(_event("huge", item={"type": "features", "x": [1.0], "y_w": 10**30, "y_l": 1})))
    assert refused.value.code == "contract"


def test_a_feature_value_float32_cannot_hold_is_refused() -> None:
    """1e40 passed the contract, became inf in the models' float32 and NaN in the condition tests' fits."""
    FeatureTriple(x=[-1e30, 1e30], y_w=0, y_l=1)
    with pytest.raises(MalformedEvent, match="x.0: Input should be less than or equal") as refused:
        decode_label_event(_raw(_event("big", item={"type": "features", "x": [1e40], "y_w": 0, "y_l": 1})))
    assert refused.value.code == "contract"


# --- 6a. the store's feature dimension -------------------------------------------------------------------------

def test_a_feature_event_of_another_dimension_than_the_store_s_is_dead_lettered(settings: Settings) -> None:
    batch = _Batch(settings)
    text = {"type": "pairwise_text", "prompt": "p", "response_a": "a", "response_b": "b", "choice": "a"}
    first = batch(_event("p5", item=_features(*[0.1] * 5)), _event("p3", item=_features(0.1, 0.2, 0.3)),
                  _event("e5", kind="expert", item=_features(*[0.2] * 5)), _event("t", item=text))
    later = batch(_event("e3", kind="expert", item=_features(1.0, 2.0, 3.0)), _event("p5b", item=_features(*[0.3] * 5)))
    letters, rows = _run(settings, first, later)
    assert _codes(letters) == {1: "dimension_mismatch", 4: "dimension_mismatch"}
    assert "x has 3 features; the store's feature labels have 5" in letters[0]["reason"]
    assert sorted(rows) == ["e5", "p5", "p5b", "t"]


def test_a_retraction_is_never_refused_for_its_item_s_dimension(settings: Settings) -> None:
    batch = _Batch(settings)
    retraction = _event("e1", kind="expert", occurred_at="2026-11-30T00:00:00Z", action="deleted",
                        item=_features(1.0, 2.0, 3.0))
    letters, rows = _run(settings, batch(_event("e1", kind="expert", item=_features(1.0, 2.0))), batch(retraction))
    assert letters == [] and rows["e1"].deleted


def test_the_store_s_dimension_is_looked_up_once_per_consumer(
    settings: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    lookups: list[int | None] = []
    real = ingest_consumer.feature_dimension

    def counted(session: Session) -> int | None:
        lookups.append(real(session))
        return lookups[-1]

    monkeypatch.setattr(ingest_consumer, "feature_dimension", counted)
    batch, dimension = _Batch(settings), FeatureDimension()
    text = {"type": "pairwise_text", "prompt": "p", "response_a": "a", "response_b": "b", "choice": "a"}
    _run(settings, batch(_event("t", item=text)), dimension=dimension)  # no feature event: no lookup
    assert lookups == []
    _run(settings, batch(_event("a"), _event("b")), dimension=dimension)  # an empty store: the batch's first fixes it
    _run(settings, batch(_event("c"), _event("d")), dimension=dimension)  # then read from the store, once
    _run(settings, batch(_event("e"), _event("f", item=_features(1.0))), dimension=dimension)
    assert lookups == [None, 2] and dimension.known == 2


# --- 7. text pairs -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, message", [
    ({"response_b": "same"}, "response_a and item.response_b must differ"),
    ({"response_a": "", "response_b": ""}, "response_a and item.response_b must differ"),
    ({"prompt": " \n\t"}, "prompt is blank"),
    ({"response_a": "x" * (MAX_TEXT_CHARS + 1)}, "at most 100000 characters"),
])
def test_text_labels_that_teach_nothing_are_refused_by_the_contract(fields: dict[str, str], message: str) -> None:
    pair = {"type": "pairwise_text", "prompt": "q", "response_a": "same", "response_b": "other", "choice": "a",
            **fields}
    for kind in ("proxy", "expert"):
        with pytest.raises(MalformedEvent, match=message) as refused:
            decode_label_event(_raw(_event("t", kind=kind, item=pair)))
        assert refused.value.code == "contract"


def test_an_uninformative_pair_is_still_an_item_and_a_retraction_may_carry_one() -> None:
    """An open Label Studio task may show two identical answers (the acquisition scores it 0): only a label of it,
    a preference that teaches nothing, is refused."""
    pair = PairwiseText(prompt="Name a colour.", response_a="Blue.", response_b="Blue.", choice="a")
    retraction = ExpertLabel(event_id="e", annotator_id="a", action="deleted", item=pair)
    assert retraction.item == pair
    with pytest.raises(ValidationError, match="must differ"):
        ExpertLabel(event_id="e", annotator_id="a", item=pair)
    with pytest.raises(ValidationError, match="must differ"):
        ProxyPreference(event_id="p", proxy_name="j", item=pair)

