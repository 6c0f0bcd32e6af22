"""The profile routes on what a PostgreSQL store refuses and on a user erased mid-request (the HTTP audit): both
were 500s, the second after its item was stored."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import event

from policies import profile_api
from policies.profile import erase_user
from proxyloop.http import create_app
from proxyloop.testing import isolated_settings

AUTH = {"Authorization": "Bearer k"}


def test_text_with_a_nul_character_is_a_422_naming_it_and_nothing_is_stored(tmp_path):
    http = TestClient(create_app(isolated_settings(tmp_path, api_keys="k")))
    for body in ({"response": "a\u0000b"}, {"response": "fine", "query": "\u0000"}):
        reply = http.post("/v1/users/nul/responses", json=body, headers=AUTH)
        assert reply.status_code == 422 and "NUL character" in reply.text
    assert http.get("/v1/users/nul/responses", headers=AUTH).json() == []


def test_a_user_erased_between_the_stores_commit_and_the_reply_gets_the_stored_item(tmp_path, monkeypatch):
    settings = isolated_settings(tmp_path, api_keys="k")
    http = TestClient(create_app(settings))
    real = profile_api.add_item

    def erased_after_commit(session, user_id, response, query):  # type: ignore[no-untyped-def]
        item = real(session, user_id, response, query)

        @event.listens_for(session, "after_commit", once=True)
        def erase(_session):  # type: ignore[no-untyped-def]
            with profile_api.profile_session(settings) as other:
                erase_user(other, user_id)
                other.commit()

        return item

    monkeypatch.setattr(profile_api, "add_item", erased_after_commit)
    reply = http.post("/v1/users/racer/responses", json={"response": "hello"}, headers=AUTH)
    assert reply.status_code == 201 and reply.json()["response"] == "hello"
    assert reply.json()["created_at"].endswith("Z")  # SQLite's naive time read back as the UTC it is
    assert http.get("/v1/users/racer/responses", headers=AUTH).json() == []


def test_a_label_whose_text_holds_a_nul_is_skipped_by_the_profile_sync_not_a_failure(tmp_path, caplog):
    """The label's item is JSON and takes a NUL; a profile item is text, which PostgreSQL refuses: the sync failed
    for every label of that annotator, and so every chat request naming them as its user."""
    from sqlalchemy.orm import Session

    from ground.schemas import ExpertLabel, PairwiseText
    from ingest.store import LabelRow, make_engine
    from ingest.upsert import upsert_events
    from policies.profile import create_tables, items_of, sync_expert_labels

    engine = make_engine(f"sqlite:///{tmp_path}/s.db")
    create_tables(engine)
    with Session(engine) as session:
        upsert_events(session, [ExpertLabel(event_id=f"l{i}", annotator_id="ann-7", item=PairwiseText(
            prompt=f"Capital of France? ({i})", response_a="Lyon", response_b="Paris.", choice="b")) for i in (1, 2)])
        row = session.get(LabelRow, "l1")
        assert row is not None
        row.item = {**row.item, "response_b": "Pa\u0000ris."}
        session.commit()
        assert sync_expert_labels(session) == 1
        assert [i.query for i in items_of(session, "ann-7")] == ["Capital of France? (2)"]
    assert "profile sync skips label l1" in caplog.text
