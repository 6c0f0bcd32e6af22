import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session

from ground.moments import utcnow
from ground.schemas import ExpertLabel, PairwiseText
from ingest.store import make_engine
from ingest.upsert import upsert_events
from policies.profile import (
    ProfileConfig,
    ProfileItem,
    build_messages,
    create_tables,
    erase_user,
    items_of,
    profile_engine,
    sync_expert_labels,
)
from proxyloop.http import create_app
from proxyloop.testing import isolated_settings
from workers.lm.models import default_corpus, train_tokenizer

AUTH = {"Authorization": "Bearer k"}


def words(text: str) -> int:
    return len(text.split())


def _items(*responses, queries=None):
    now = utcnow()
    return [ProfileItem(id=i + 1, user_id="u", response=r, query=(queries or [None] * len(responses))[i],
                        source="api", created_at=now + timedelta(seconds=i)) for i, r in enumerate(responses)]


ASK = [{"role": "user", "content": "tell me about sailing boats"}]


def test_response_only_items_go_first_in_relevance_order():
    items = _items("I love cooking pasta.", "Sailing boats are my passion.", "Boats and sailing, always.")
    messages, report = build_messages(ASK, items, ProfileConfig(budget_tokens=100), words)
    assert messages[0]["role"] == "system" and messages[1:] == ASK
    assert report.item_ids[:2] in ([2, 3], [3, 2]) and report.item_ids[-1] == 1
    assert "Q:" not in messages[0]["content"]


def test_a_response_posted_many_times_takes_one_line():
    items = _items(*["Sailing boats are my passion."] * 12, "I love cooking pasta.")
    messages, report = build_messages(ASK, items, ProfileConfig(budget_tokens=100), words)
    assert messages[0]["content"].count("Sailing boats are my passion.") == 1 and len(report.item_ids) == 2
    assert "I love cooking pasta." in messages[0]["content"]


def test_recency_order_and_end_position_follow_the_config():
    items = _items("old sailing answer", "new cooking answer", queries=["q1", "q2"])
    messages, report = build_messages(ASK, items, ProfileConfig(order="recency", position="end", include_query=True),
                                      words)
    assert report.item_ids == [2, 1] and report.position == "end"
    # "end": the profile follows the question inside the last user turn; nothing else is added.
    assert len(messages) == 1 and messages[0]["role"] == "user"
    question, profile = messages[0]["content"].split("\n\n", 1)
    assert question == ASK[0]["content"]
    assert profile.startswith(ProfileConfig().header) and "Q: q2" in profile


def test_end_position_keeps_earlier_turns_and_the_system_prompt_in_place():
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, *ASK]
    start, _ = build_messages(chat, _items("sailing is fun"), ProfileConfig(position="start"), words)
    end, _ = build_messages(chat, _items("sailing is fun"), ProfileConfig(position="end"), words)
    assert start[0]["role"] == "system" and "sailing is fun" in start[0]["content"] and start[1:] == chat
    assert end[:-1] == chat[:-1] and end[-1]["content"].startswith(ASK[0]["content"] + "\n\n")
    assert end[-1]["content"].endswith("- sailing is fun")


def _chat_tokens(messages):
    text = TINY_TOKENIZER.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return TINY_TOKENIZER(text, add_special_tokens=False).input_ids


TINY_TOKENIZER = train_tokenizer(default_corpus())
LAYOUTS = {(position, include_query): ProfileConfig(position=position, include_query=include_query)
           for position in ("start", "end") for include_query in (False, True)}


def test_every_layout_renders_different_tokens_through_the_chat_template():
    items = _items("Sailing boats are my passion.", "I race dinghies on weekends.",
                   queries=["What do you love?", "What do you do on weekends?"])
    count = lambda text: len(TINY_TOKENIZER(text).input_ids)  # noqa: E731
    rendered = {layout: _chat_tokens(build_messages(ASK, items, config, count)[0])
                for layout, config in LAYOUTS.items()}
    assert len({tuple(tokens) for tokens in rendered.values()}) == len(LAYOUTS)
    question = TINY_TOKENIZER.apply_chat_template(ASK, tokenize=False, add_generation_prompt=True)
    for (position, include_query), tokens in rendered.items():
        text = TINY_TOKENIZER.decode(tokens)
        assert text != question and ASK[0]["content"] in text
        # start: the profile precedes the question; end: it follows it, just before the reply.
        before = text.index(ProfileConfig().header) < text.index(ASK[0]["content"])
        assert before == (position == "start")
        # response-only items carry no inputs; query+response items carry each as `Q:`.
        assert ("Q: What do you love?" in text) == include_query and "Sailing boats are my passion." in text


@settings(max_examples=200, deadline=None)
@given(responses=st.lists(st.text(min_size=1, max_size=80), min_size=0, max_size=20),
       budget=st.integers(min_value=1, max_value=120))
def test_the_budget_is_never_exceeded(responses, budget):
    messages, report = build_messages(ASK, _items(*responses), ProfileConfig(budget_tokens=budget), words)
    if report.item_ids:
        assert words(messages[0]["content"]) <= budget and report.tokens <= budget
    else:
        assert messages == ASK


def test_config_rejects_unknown_positions():
    with pytest.raises(ValueError, match="position"):
        ProfileConfig(position="middle")  # type: ignore[arg-type]


def test_chosen_responses_of_text_labels_become_the_annotators_profile(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/s.db")
    create_tables(engine)
    with Session(engine) as session:
        upsert_events(session, [ExpertLabel(event_id="l1", annotator_id="ann-7", item=PairwiseText(
            prompt="Capital of France?", response_a="Lyon", response_b="Paris, of course.", choice="b"))])
        assert sync_expert_labels(session) == 1
        assert sync_expert_labels(session) == 0  # idempotent
        assert [(i.response, i.query) for i in items_of(session, "ann-7")] == [("Paris, of course.",
                                                                                "Capital of France?")]
        erase_user(session, "ann-7")
        assert sync_expert_labels(session) == 0 and items_of(session, "ann-7") == []  # erasure sticks


def test_concurrent_syncs_of_one_annotator_store_each_label_once(tmp_path):
    """Concurrent chat requests with the same `user` each sync that annotator's labels: the inserts race on
    the unique source id, and the losers must return the stored item, not raise IntegrityError (a 500)."""
    url = f"sqlite:///{tmp_path}/s.db"
    engine = make_engine(url)
    create_tables(engine)
    with Session(engine) as session:
        upsert_events(session, [ExpertLabel(event_id=f"l{i}", annotator_id="ann-7", item=PairwiseText(
            prompt=f"q{i}", response_a=f"a{i}", response_b=f"b{i}", choice="a")) for i in range(150)])
        session.commit()
    start = threading.Barrier(6)

    def sync(_: int) -> int:
        start.wait()
        with Session(profile_engine(url)) as session:
            added = sync_expert_labels(session, "ann-7")
            session.commit()
            return added

    with ThreadPoolExecutor(6) as pool:
        added = list(pool.map(sync, range(6)))
    with Session(engine) as session:
        assert sorted(i.response for i in items_of(session, "ann-7")) == sorted(f"a{i}" for i in range(150))
    assert sum(added) >= 150  # each label counted by whoever stored it (a loser may count one it lost)


def test_concurrent_first_uses_of_a_store_create_the_profile_tables_once(tmp_path):
    """`lru_cache` does not stop concurrent first callers from all creating the tables; they must not collide."""
    url = f"sqlite:///{tmp_path}/fresh.db"
    start = threading.Barrier(8)

    def first_use(_: int) -> int:
        start.wait()
        with Session(profile_engine(url)) as session:
            return len(items_of(session, "nobody"))

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(first_use, range(8))) == [0] * 8


def test_erasure_removes_every_item_of_the_user_and_nothing_else(tmp_path):
    http = TestClient(create_app(isolated_settings(tmp_path, api_keys="k")))
    for user, text in [("alice", "one"), ("alice", "two"), ("bob", "three")]:
        assert http.post(f"/v1/users/{user}/responses", json={"response": text}, headers=AUTH).status_code == 201
    assert len(http.get("/v1/users/alice/responses", headers=AUTH).json()) == 2
    assert http.delete("/v1/users/alice", headers=AUTH).json() == {"user_id": "alice", "items_deleted": 2}
    assert http.get("/v1/users/alice/responses", headers=AUTH).json() == []
    assert [r["response"] for r in http.get("/v1/users/bob/responses", headers=AUTH).json()] == ["three"]
    assert http.delete("/v1/users/alice", headers={}).status_code == 401
    assert http.post("/v1/users/bad%20id/responses", json={"response": "x"}, headers=AUTH).status_code == 422
