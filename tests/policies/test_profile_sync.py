"""A profile follows its annotator's labels as the store has them now (policies/profile.sync_expert_labels): an
edited label's item takes the new choice and a retracted label's item goes. Before, both stayed in the profile for
good, and serving kept showing the model a choice the annotator had withdrawn. And chat personalises only user ids
the profile endpoints can address, so whatever a profile serves can be listed and erased."""

from datetime import timedelta

from sqlalchemy.orm import Session

from ground.moments import utcnow
from ground.schemas import ExpertLabel, PairwiseText
from ingest.store import make_engine
from ingest.upsert import upsert_events
from policies.profile import create_tables, items_of, sync_expert_labels

PAIR = {"prompt": "Capital of France?", "response_a": "Lyon is the capital.", "response_b": "Paris, of course."}


def test_an_edited_label_updates_its_item_and_a_retracted_one_removes_it(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/store.db")
    create_tables(engine)
    t0 = utcnow()
    with Session(engine) as session:
        upsert_events(session, [
            ExpertLabel(event_id=f"l{i}", annotator_id="ann-7", occurred_at=t0, item=PairwiseText(**PAIR, choice=c))
            for i, c in ((1, "a"), (2, "b"), (3, "a"))])
        assert sync_expert_labels(session, "ann-7") == 3
        later = t0 + timedelta(minutes=1)
        upsert_events(session, [
            ExpertLabel(event_id="l1", annotator_id="ann-7", action="updated", occurred_at=later,
                        item=PairwiseText(**PAIR, choice="b")),
            ExpertLabel(event_id="l2", annotator_id="ann-7", action="deleted", occurred_at=later)])
        assert sync_expert_labels(session, "ann-7") == 0
        session.commit()
        assert sorted((i.source_id, i.response) for i in items_of(session, "ann-7")) == [
            ("l1", "Paris, of course."), ("l3", "Lyon is the capital.")]
