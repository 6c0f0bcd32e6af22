"""The official `openai` client, unmodified, against the serving endpoint."""

import hashlib

import openai
import pytest
from fastapi.testclient import TestClient

from policies import openai_api
from policies.lm.chat import register_causal_lm
from policies.openai_wire import MAX_TOKENS_LIMIT
from policies.registry import set_alias
from proxyloop.http import create_app
from proxyloop.testing import isolated_settings
from workers.lm.models import build_tiny


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    home = tmp_path_factory.mktemp("openai")
    hashed = hashlib.sha256(b"hashed-key").hexdigest()
    settings = isolated_settings(home, api_keys="plain-key", api_key_hashes=hashed,
                                 registry_url=str(home / "registry"), max_request_bytes=4096)
    for seed in (0, 1):
        register_causal_lm(settings.registry_dir, "chat", build_tiny(home / f"tiny{seed}", seed=seed), {"seed": seed})
    http = TestClient(create_app(settings))
    return settings, http


def _client(http, key="plain-key"):
    return openai.OpenAI(base_url=f"{http.base_url}/v1", api_key=key, http_client=http, max_retries=0)


def test_lists_models_and_completes_a_chat(served):
    _, http = served
    client = _client(http)
    assert "chat@production" in [m.id for m in client.models.list().data]
    completion = client.chat.completions.create(
        model="chat@production", messages=[{"role": "user", "content": "What is 2 plus 3?"}],
        max_tokens=8, temperature=0)
    assert completion.model == "chat@2"
    assert completion.usage.completion_tokens <= 8 and completion.usage.prompt_tokens > 0
    # "length" exactly when the token budget ran out, "stop" when the model ended its turn first.
    assert completion.choices[0].finish_reason == ("length" if completion.usage.completion_tokens == 8 else "stop")


def test_streamed_completion_equals_the_unstreamed_one(served):
    _, http = served
    client = _client(http)
    messages = [{"role": "user", "content": "the expert ranks both drafts."}]
    whole = client.chat.completions.create(model="chat", messages=messages, max_tokens=10, temperature=0)
    pieces = [chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="chat", messages=messages, max_tokens=10, temperature=0, stream=True)]
    assert "".join(pieces) == whole.choices[0].message.content


def test_a_key_configured_only_as_a_hash_is_accepted(served):
    _, http = served
    assert _client(http, "hashed-key").models.list().data


def test_wrong_or_missing_key_is_401(served):
    _, http = served
    with pytest.raises(openai.AuthenticationError):
        _client(http, "wrong").models.list()
    assert http.post("/v1/chat/completions", json={"model": "chat", "messages": []}).status_code == 401


def test_rollback_is_served_without_restart(served):
    settings, http = served
    client = _client(http)
    set_alias(settings.registry_dir, "chat", "production", 1)
    try:
        reply = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=2, temperature=0)
        assert reply.model == "chat@1"
    finally:
        set_alias(settings.registry_dir, "chat", "production", 2)


def test_oversized_and_invalid_requests_get_clear_4xx(served):
    _, http = served
    client = _client(http)
    with pytest.raises(openai.APIStatusError) as too_big:
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x" * 10_000}])
    assert too_big.value.status_code == 413
    # The SDK reads the reason from OpenAI's `error` object only: without it, these said just "Error code: N".
    assert "exceeds the limit of 4096 bytes (PROXYLOOP_MAX_REQUEST_BYTES)" in too_big.value.message
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert "nope has no alias 'production'" in unknown.value.message
    with pytest.raises(openai.UnprocessableEntityError) as invalid:
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=10_000)
    assert "max_tokens: Input should be less than or equal to 512" in invalid.value.message
    assert invalid.value.body["param"] == "max_tokens"
    with pytest.raises(openai.AuthenticationError) as wrong_key:
        _client(http, "wrong").models.list()
    assert wrong_key.value.message != "Error code: 401" and wrong_key.value.body["type"] == "authentication_error"


def test_a_model_is_retrieved_by_any_ref_chat_completions_takes(served):
    _, http = served
    client = _client(http)
    for ref, version in (("chat", 2), ("chat@production", 2), ("chat@1", 1)):
        card = client.models.retrieve(ref)
        assert (card.id, card.version) == (ref, version)  # type: ignore[attr-defined]
    with pytest.raises(openai.NotFoundError, match="has no version 9"):
        client.models.retrieve("chat@9")


def test_a_tool_calling_history_is_refused_by_name(served):
    """An agent loop's history (an assistant turn with tool_calls and null content, then a tool result) was a 422
    listing pydantic's union errors; now a 400 that says what is not supported."""
    _, http = served
    client = _client(http)
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
    history = [{"role": "user", "content": "add"}, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "c1", "content": "5"}]
    with pytest.raises(openai.BadRequestError, match="tool") as refused:
        client.chat.completions.create(model="chat", messages=history)  # type: ignore[arg-type]
    assert refused.value.body["param"] == "messages"
    reply = client.chat.completions.create(model="chat", max_tokens=2, messages=[
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": None}, {"role": "user", "content": "x"}])
    assert reply.choices  # an assistant turn with no content is an empty turn, not a refusal
    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError, match='tool_choice "none"'):
        client.chat.completions.create(model="chat", max_tokens=2, messages=history[:1], tools=[tool])
    plain = client.chat.completions.create(model="chat", max_tokens=2, messages=history[:1], tools=[tool],
                                           tool_choice="none")  # tools offered, a text reply asked for: served
    assert plain.choices[0].message.tool_calls is None


def test_a_chat_template_that_refuses_the_messages_is_a_400(served, monkeypatch):
    """Llama-2, Mistral and Gemma templates raise on roles that do not alternate: that was a 500."""
    settings, http = served
    policy = openai_api.chat_policy(settings, "chat")
    strict = ("{% for m in messages %}{% if loop.index0 % 2 == 0 and m['role'] != 'user' %}"
              "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
              "{% endif %}{{ m['content'] }}{% endfor %}")
    monkeypatch.setattr(policy.tokenizer, "chat_template", strict)
    with pytest.raises(openai.BadRequestError, match="chat template refuses these messages: Conversation roles"):
        _client(http).chat.completions.create(model="chat", messages=[{"role": "system", "content": "be brief"}])


def test_the_user_field_puts_the_profile_after_the_question_by_default_and_says_so_in_a_header(served):
    settings, http = served
    for text in ["the annotator prefers the first response.", "What is 2 plus 2? It is 4."]:
        http.post("/v1/users/u1/responses", json={"response": text}, headers={"Authorization": "Bearer plain-key"})
    client = _client(http)
    ask = [{"role": "user", "content": "What is 3 plus 4?"}]
    plain = client.chat.completions.create(model="chat", messages=ask, max_tokens=2, temperature=0)
    raw = client.chat.completions.with_raw_response.create(model="chat", messages=ask, max_tokens=2,
                                                           temperature=0, user="u1")
    header = raw.headers["x-proxyloop-profile"]
    assert header.startswith("items=2;") and "position=end" in header  # the setting's default (bench/profile.py)
    assert raw.parse().usage.prompt_tokens > plain.usage.prompt_tokens
    tokens = int(header.split("tokens=")[1].split(";")[0])
    assert 0 < tokens <= settings.profile_budget_tokens


def test_the_profile_takes_only_the_room_the_conversation_leaves(served):
    """A conversation that fits the context alone is served with `user` too: the profile shrinks to what is left
    (before, a fixed budget pushed it past the context and the request was refused for the client's messages)."""
    settings, http = served
    for i in range(10):
        http.post("/v1/users/u2/responses", json={"response": f"I usually answer with sailing boats and pasta {i}."},
                  headers={"Authorization": "Bearer plain-key"})
    talk = []
    for i in range(4):
        talk += [{"role": "user", "content": f"question {i} about sailing boats and cooking pasta"},
                 {"role": "assistant", "content": f"answer {i} about sailing boats"}]
    talk.append({"role": "user", "content": "tell me about sailing boats"})
    client = _client(http)
    plain = client.chat.completions.create(model="chat", messages=talk, max_tokens=4, temperature=0)
    assert plain.usage.prompt_tokens + 4 + settings.profile_budget_tokens > 512  # the setting's budget alone overflows
    raw = client.chat.completions.with_raw_response.create(model="chat", messages=talk, max_tokens=4, temperature=0,
                                                           user="u2")
    header, reply = raw.headers["x-proxyloop-profile"], raw.parse()
    assert not header.startswith("items=0;")
    assert plain.usage.prompt_tokens < reply.usage.prompt_tokens <= 512 - 4
    policy = openai_api.chat_policy(settings, "chat")
    asks = ([{"role": "user", "content": "sailing " * n}] for n in range(40, 200))
    full = next(m for m in asks if 500 <= policy.prompt_ids(m).shape[1] < 508)  # fits, leaves no room for a profile
    raw = client.chat.completions.with_raw_response.create(model="chat", messages=full, max_tokens=4, user="u2")
    assert raw.headers["x-proxyloop-profile"].startswith("items=0;")


def test_a_user_id_the_profile_endpoints_cannot_address_gets_no_profile(served):
    """An annotator id like "Jane Doe <jane+lab@example.org>" is fine on a label, but /v1/users/{id} refuses it: a
    profile built under it could be neither listed nor erased, so none is built."""
    from sqlalchemy.orm import Session

    from ground.schemas import ExpertLabel, PairwiseText
    from ingest.store import make_engine
    from ingest.upsert import upsert_events

    settings, http = served
    odd = "Jane Doe <jane+lab@example.org>"
    with Session(make_engine(settings.resolved_store_url)) as session:
        upsert_events(session, [ExpertLabel(event_id="odd-1", annotator_id=odd, item=PairwiseText(
            prompt="Capital of France?", response_a="Lyon", response_b="Paris, my dear friend.", choice="b"))])
        session.commit()
    raw = _client(http).chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "Capital?"}], max_tokens=2, user=odd)
    assert raw.headers["x-proxyloop-profile"].startswith("items=0;")
    assert http.get("/v1/users/Jane%20Doe/responses", headers={"Authorization": "Bearer plain-key"}).status_code == 422


def test_a_request_without_max_tokens_gets_as_many_as_fit(served):
    """OpenAI's default, what LangChain and LiteLLM rely on: replies were cut at 64 tokens."""
    settings, http = served
    policy = openai_api.chat_policy(settings, "chat")
    ends = {policy.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", policy.tokenizer.eos_token)}
    reply = _client(http).chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hi"}], temperature=0,
        logit_bias={str(token): -100 for token in ends})  # never ends its turn: only the budget stops it
    room = min(MAX_TOKENS_LIMIT, policy.context_limit - reply.usage.prompt_tokens)
    assert reply.usage.completion_tokens == room > 64 and reply.choices[0].finish_reason == "length"
