from datetime import timedelta

from sqlalchemy.orm import Session

from ground.moments import utcnow
from ground.schemas import ExpertLabel, FeatureTriple, PairwiseText, ProxyPreference
from ingest.store import (
    count_labels,
    freeze_snapshot,
    live_expert_items,
    load_snapshot_triples,
    make_engine,
    split_expert,
)
from ingest.upsert import upsert_events


def _proxy(i: int) -> ProxyPreference:
    return ProxyPreference(event_id=f"p{i}", proxy_name="judge", item=FeatureTriple(x=[float(i)], y_w=0, y_l=1))


def _expert(i: int, **kw: object) -> ExpertLabel:
    return ExpertLabel(event_id=f"e{i}", annotator_id="ann", item=FeatureTriple(x=[float(i)], y_w=1, y_l=2), **kw)


def test_redelivered_events_are_stored_once(store_url):
    engine = make_engine(store_url)
    with Session(engine) as session:
        events = [_proxy(1), _proxy(2), _expert(1)]
        assert upsert_events(session, events) == 3
        assert upsert_events(session, events) == 0  # the same deliveries again
        session.commit()
        assert count_labels(session) == {"expert": 1, "proxy": 2}


def test_newer_update_replaces_and_deletion_retracts(store_url):
    engine = make_engine(store_url)
    created = _expert(1)
    later = created.occurred_at + timedelta(seconds=5)
    updated = ExpertLabel(event_id="e1", annotator_id="ann", action="updated", occurred_at=later,
                          item=FeatureTriple(x=[9.0], y_w=2, y_l=1))
    with Session(engine) as session:
        upsert_events(session, [created, updated])
        snap = freeze_snapshot(session)
        assert load_snapshot_triples(session, snap.snapshot_id)["expert"][0].y_w == 2
        deleted = ExpertLabel(event_id="e1", annotator_id="ann", action="deleted", occurred_at=later + timedelta(1),
                              item=updated.item)
        upsert_events(session, [deleted])
        assert count_labels(session)["expert"] == 0


def test_snapshot_id_is_a_content_hash(store_url):
    engine = make_engine(store_url)
    with Session(engine) as session:
        upsert_events(session, [_proxy(1), _expert(1)])
        first = freeze_snapshot(session).snapshot_id
        assert freeze_snapshot(session).snapshot_id == first
        upsert_events(session, [_proxy(2)])
        second = freeze_snapshot(session)
        assert second.snapshot_id != first
        assert (second.n_expert, second.n_proxy) == (1, 2)


def test_heldout_split_is_deterministic_and_disjoint():
    triples = [FeatureTriple(x=[float(i)], y_w=0, y_l=1) for i in range(9)]
    train, heldout = split_expert(triples)
    assert len(heldout) == 3 and len(train) == 6
    assert not {t.x[0] for t in train} & {t.x[0] for t in heldout}
    assert split_expert(triples) == (train, heldout)
    assert [t.x[0] for t in heldout] == [0.0, 3.0, 6.0]  # every third, as before, when every input is distinct


def test_copies_of_one_input_stay_on_one_side_of_the_heldout_split():
    """Two annotators on one task: before, the second copy of input 0 was trained on and the first held out."""
    triples = [FeatureTriple(x=[float(i // 2)], y_w=0, y_l=1) for i in range(12)]  # each input twice, in a row
    train, heldout = split_expert(triples)
    assert not {t.x[0] for t in train} & {t.x[0] for t in heldout}
    assert [t.x[0] for t in heldout] == [0.0, 0.0, 3.0, 3.0]


def test_older_event_does_not_overwrite_newer(store_url):
    engine = make_engine(store_url)
    newer = _expert(1, occurred_at=utcnow())
    older = ExpertLabel(event_id="e1", annotator_id="ann", occurred_at=newer.occurred_at - timedelta(hours=1),
                        item=FeatureTriple(x=[0.0], y_w=2, y_l=0))
    with Session(engine) as session:
        upsert_events(session, [newer])
        assert upsert_events(session, [older]) == 0


def test_every_write_is_kept_in_history_and_a_retraction_needs_no_item(store_url):
    from ingest.store import label_history

    engine = make_engine(store_url)
    created = _expert(1)
    updated = ExpertLabel(event_id="e1", annotator_id="ann", action="updated",
                          occurred_at=created.occurred_at + timedelta(seconds=1),
                          item=FeatureTriple(x=[2.0], y_w=2, y_l=1))
    retracted = ExpertLabel(event_id="e1", annotator_id="ann", action="deleted",
                            occurred_at=created.occurred_at + timedelta(seconds=2))
    with Session(engine) as session:
        assert upsert_events(session, [created, updated, retracted, updated]) == 3  # the late copy is a no-op
        session.commit()
        history = label_history(session, "e1")
        assert [h.action for h in history] == ["created", "updated", "deleted"]
        assert [h.item["y_w"] if h.item else None for h in history] == [1, 2, None]
        assert count_labels(session)["expert"] == 0
        assert freeze_snapshot(session).n_expert == 0


def test_a_retraction_that_overtakes_its_creation_is_not_undone_by_it(store_url):
    engine = make_engine(store_url)
    created = _expert(1)
    retracted = ExpertLabel(event_id="e1", annotator_id="ann", action="deleted",
                            occurred_at=created.occurred_at + timedelta(seconds=1))
    with Session(engine) as session:
        upsert_events(session, [retracted])
        assert upsert_events(session, [created]) == 0
        session.commit()
        assert count_labels(session)["expert"] == 0


def test_only_a_retraction_may_omit_the_item():
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="item is required"):
        ExpertLabel(event_id="e1", annotator_id="ann", action="updated")
    with pytest.raises(ValidationError):
        FeatureTriple(x=[float("nan")], y_w=0, y_l=1)


def test_forty_identical_redeliveries_stamped_later_write_nothing(store_url):
    from ingest.store import label_history

    engine = make_engine(store_url)
    original = _proxy(1)
    copies = [original.model_copy(update={"occurred_at": original.occurred_at + timedelta(seconds=i)})
              for i in range(1, 41)]
    with Session(engine) as session:
        assert upsert_events(session, [original]) == 1
        assert sum(upsert_events(session, [copy]) for copy in copies) == 0
        assert upsert_events(session, copies) == 0  # in one batch too
        session.commit()
        assert len(label_history(session, "p1")) == 1


def test_the_stored_version_does_not_depend_on_arrival_order(store_url):
    from itertools import permutations

    from sqlalchemy import delete

    from ingest.store import LabelHistoryRow, LabelRow

    engine = make_engine(store_url)
    t0 = utcnow()
    versions = [
        ExpertLabel(event_id="e1", annotator_id="ann", occurred_at=t0, item=FeatureTriple(x=[1.0], y_w=0, y_l=1)),
        # Two different versions at the same moment: ordered by content hash, not by arrival.
        ExpertLabel(event_id="e1", annotator_id="ann", action="updated", occurred_at=t0 + timedelta(seconds=1),
                    item=FeatureTriple(x=[2.0], y_w=0, y_l=1)),
        ExpertLabel(event_id="e1", annotator_id="ann", action="updated", occurred_at=t0 + timedelta(seconds=1),
                    item=FeatureTriple(x=[3.0], y_w=0, y_l=1)),
    ]
    outcomes = set()
    for order in permutations(versions):
        with Session(engine) as session:
            for event in order:  # one delivery at a time, as a consumer re-reading after a rewind would
                upsert_events(session, [event])
            outcomes.add(tuple(session.get(LabelRow, "e1").item["x"]))
            session.execute(delete(LabelRow))
            session.execute(delete(LabelHistoryRow))
            session.commit()
    assert len(outcomes) == 1 and outcomes.pop() in {(2.0,), (3.0,)}


def test_new_labels_are_counted_once_and_a_retraction_that_arrives_first_is_not_one(store_url):
    from ingest.store import count_new_labels

    engine = make_engine(store_url)
    with Session(engine) as session:
        upsert_events(session, [_proxy(1), _proxy(2), _expert(1)])
        tombstone = ExpertLabel(event_id="e9", annotator_id="ann", action="deleted", occurred_at=utcnow())
        upsert_events(session, [tombstone])
        cursor = count_new_labels(session)
        assert (cursor.expert_new, cursor.proxy_new) == (1, 2)
        assert (count_new_labels(session).expert_new, count_new_labels(session).proxy_new) == (1, 2)  # once
        upsert_events(session, [_proxy(3)])
        assert count_new_labels(session).proxy_new == 3


def test_live_expert_items_are_the_kind_asked_for_in_event_order_without_retractions(store_url):
    text = PairwiseText(prompt="p", response_a="a", response_b="b", choice="a")
    events = [_expert(3), ExpertLabel(event_id="t1", annotator_id="ann", item=text), _expert(1), _expert(2), _proxy(1)]
    with Session(make_engine(store_url)) as session:
        upsert_events(session, events)
        later = utcnow() + timedelta(seconds=5)
        upsert_events(session, [ExpertLabel(event_id="e2", annotator_id="ann", action="deleted", occurred_at=later)])
        assert [t.x for t in live_expert_items(session, FeatureTriple)] == [[1.0], [3.0]]
        assert live_expert_items(session, PairwiseText) == [text]


def test_versions_are_ordered_and_stored_in_utc_whatever_their_offset_and_arrival(store_url):
    """12:00-05:00 is 17:00Z, later than 15:00Z; SQLite keeps no offset, so a store that kept 12:00 would pick
    whichever arrived last."""
    from datetime import UTC, datetime

    from sqlalchemy import delete

    from ingest.store import LabelHistoryRow, LabelRow
    from ingest.upsert import upsert_events as upsert

    later = ProxyPreference.model_validate({"event_id": "b", "proxy_name": "j", "occurred_at": "2026-01-01T12:00-05:00",
                                            "item": {"type": "features", "x": [1.0], "y_w": 0, "y_l": 1}})
    earlier = ProxyPreference.model_validate({"event_id": "b", "proxy_name": "j", "occurred_at": "2026-01-01T15:00Z",
                                              "item": {"type": "features", "x": [2.0], "y_w": 0, "y_l": 1}})
    engine = make_engine(store_url)
    for order in ((later, earlier), (earlier, later)):
        for event in order:  # one committed batch each: the second compares with what the store gave back
            with Session(engine) as session:
                upsert(session, [event])
                session.commit()
        with Session(engine) as session:
            row = session.get(LabelRow, "b")
            assert row.item["x"] == [1.0]
            assert row.occurred_at.replace(tzinfo=row.occurred_at.tzinfo or UTC) == datetime(2026, 1, 1, 17, tzinfo=UTC)
            session.execute(delete(LabelRow))
            session.execute(delete(LabelHistoryRow))
            session.commit()


def test_a_snapshot_mixing_feature_dimensions_names_the_odd_events(store_url):
    import pytest

    from ingest.store import MixedDimensions

    events = [_proxy(i) for i in range(3)] + [_expert(1), ProxyPreference(
        event_id="p-odd", proxy_name="judge", item=FeatureTriple(x=[1.0, 2.0, 3.0], y_w=0, y_l=1))]
    with Session(make_engine(store_url)) as session:
        upsert_events(session, events)  # as a store written before the consumer refused other dimensions
        snapshot = freeze_snapshot(session)
        with pytest.raises(ValueError, match=r"4 of dimension 1, 1 of dimension 3.*these do not: p-odd \(x of 3\)"
                           ) as mixed:
            load_snapshot_triples(session, snapshot.snapshot_id)
        assert isinstance(mixed.value, MixedDimensions) and mixed.value.dimensions == [1, 3]


def test_the_feature_dimension_is_that_of_the_oldest_live_feature_label(store_url):
    from ingest.store import feature_dimension

    text = PairwiseText(prompt="p", response_a="a", response_b="b", choice="a")
    with Session(make_engine(store_url)) as session:
        assert feature_dimension(session) is None
        upsert_events(session, [ProxyPreference(event_id="t", proxy_name="judge", item=text), _expert(1)])
        assert feature_dimension(session) == 1
        upsert_events(session, [ExpertLabel(event_id="e1", annotator_id="ann", action="deleted",
                                             occurred_at=utcnow() + timedelta(seconds=5))])
        assert feature_dimension(session) is None  # only text and a retraction left
        upsert_events(session, [ProxyPreference(event_id="p", proxy_name="judge",
                                                item=FeatureTriple(x=[1.0, 2.0], y_w=0, y_l=1))])
        assert feature_dimension(session) == 2
