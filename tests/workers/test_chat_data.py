"""A snapshot's pairwise-text labels become the JSONL files DPO trains and evaluates on."""

import json

from sqlalchemy.orm import Session

from ground.schemas import ExpertLabel, FeatureTriple, PairwiseText, ProxyPreference
from ingest.store import freeze_snapshot, make_engine
from ingest.text_snapshot import snapshot_item_kind
from ingest.upsert import upsert_events
from workers.lm.snapshot_data import chat_prompt, write_snapshot_datasets


def _pair(i: int, choice: str) -> PairwiseText:
    return PairwiseText(prompt=f"What is {i} plus 1?", response_a=f"good {i}", response_b=f"bad {i}",
                        choice="a" if choice == "a" else "b")


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_chosen_follows_choice_and_pairs_are_split_into_proxy_expert_and_heldout(tmp_path):
    store_url = f"sqlite:///{tmp_path}/store.db"
    with Session(make_engine(store_url)) as session:
        upsert_events(session, [ExpertLabel(event_id=f"e{i}", annotator_id="ann", item=_pair(i, "ab"[i % 2]))
                                for i in range(6)])
        upsert_events(session, [ProxyPreference(event_id="p0", proxy_name="judge", item=_pair(100, "b")),
                                ProxyPreference(event_id="p1", proxy_name="judge",
                                                item=FeatureTriple(x=[0.0], y_w=0, y_l=1))])
        snapshot_id = freeze_snapshot(session).snapshot_id
        session.commit()

    data = write_snapshot_datasets(store_url, snapshot_id, tmp_path / "data")

    assert data.snapshot_id == snapshot_id
    assert (data.n_expert_train, data.n_heldout, data.n_proxy) == (4, 2, 1)  # the feature item is ignored
    proxy, expert = _rows(tmp_path / "data" / "proxy.jsonl"), _rows(tmp_path / "data" / "expert.jsonl")
    heldout = _rows(tmp_path / "data" / "heldout.jsonl")
    assert (data.proxy, data.expert) == (str(tmp_path / "data" / "proxy.jsonl"),
                                         str(tmp_path / "data" / "expert.jsonl"))
    assert [r["source"] for r in expert] == ["expert"] * 4 and [r["source"] for r in proxy] == ["proxy"]
    # e0 (choice a) and e3 (choice b) are every third expert label: held out, never trained on.
    assert heldout[0] == {"prompt": chat_prompt("What is 0 plus 1?"), "chosen": "good 0<|im_end|>",
                          "rejected": "bad 0<|im_end|>", "source": "expert"}
    assert heldout[1]["chosen"] == "bad 3<|im_end|>" and heldout[1]["rejected"] == "good 3<|im_end|>"
    assert proxy[0]["chosen"] == "bad 100<|im_end|>"
    assert not {r["prompt"] for r in heldout} & {r["prompt"] for r in expert + proxy}


def test_the_newest_label_decides_the_snapshot_kind(tmp_path):
    store_url = f"sqlite:///{tmp_path}/store.db"
    with Session(make_engine(store_url)) as session:
        upsert_events(session, [ExpertLabel(event_id="z-feature", annotator_id="a",
                                            item=FeatureTriple(x=[0.0], y_w=0, y_l=1))])
        first = freeze_snapshot(session).snapshot_id
        upsert_events(session, [ExpertLabel(event_id="a-text", annotator_id="a", item=_pair(1, "a"))])
        second = freeze_snapshot(session).snapshot_id
        session.commit()
        assert snapshot_item_kind(session, first) == "features"
        assert snapshot_item_kind(session, second) == "pairwise_text"
