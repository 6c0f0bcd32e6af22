"""What OpenAI clients send and expect from /v1/chat/completions, beyond the basics of test_openai_api.py: text
outside ASCII, honest usage, the parameters OpenAI documents (stop, n, stream_options, nulls, content parts), clear
4xx for what this server cannot do, and a streamed failure that the client sees as one.

Where the text must be known in advance, the released tiny model is swapped for `Forced`, which puts all next-token
mass on a fixed token sequence; the rest runs the real tiny model."""

import json
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
from fastapi.testclient import TestClient

from policies import openai_api
from policies.lm.chat import register_causal_lm
from proxyloop.http import create_app
from proxyloop.testing import isolated_settings
from workers.lm.models import build_tiny

NAME = "compat"  # served models are cached by (name, version) process-wide: a name of this module's own
AUTH = {"Authorization": "Bearer k"}
ASK = [{"role": "user", "content": "hi"}]


class Forced(torch.nn.Module):
    """Stands in for the LM: next-token logits with all mass on `tokens[step]` (the last repeats); raises at step
    `fail_at`; `context` is the position limit its config reports."""

    def __init__(self, tokens: list[int], vocab: int, context: int = 512, fail_at: int | None = None) -> None:
        super().__init__()
        self.tokens, self.vocab, self.fail_at = tokens, vocab, fail_at
        self.config = SimpleNamespace(max_position_embeddings=context, vocab_size=vocab)

    def forward(self, input_ids: torch.Tensor, past_key_values: int | None = None,
                use_cache: bool = True) -> SimpleNamespace:
        step = 0 if past_key_values is None else past_key_values + 1
        if step == self.fail_at:
            raise RuntimeError("the accelerator went away")
        logits = torch.full((1, input_ids.shape[1], self.vocab), -1e9)
        logits[0, -1, self.tokens[min(step, len(self.tokens) - 1)]] = 0.0
        return SimpleNamespace(logits=logits, past_key_values=step)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    home = tmp_path_factory.mktemp("compat")
    settings = isolated_settings(home, api_keys="k", registry_url=str(home / "registry"))
    register_causal_lm(settings.registry_dir, NAME, build_tiny(home / "tiny", seed=0), {"seed": 0})
    http = TestClient(create_app(settings), raise_server_exceptions=False)
    client = openai.OpenAI(base_url=f"{http.base_url}/v1", api_key="k", http_client=http, max_retries=0)
    return SimpleNamespace(http=http, client=client, policy=openai_api.chat_policy(settings, NAME))


def _force(served: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, text: str | None = None,
           tokens: list[int] | None = None, **options: int) -> list[int]:
    """Make the served policy write `text` (then end its turn) or repeat `tokens`; the ids it will generate."""
    tokenizer = served.policy.tokenizer
    if tokens is None:
        tokens = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    monkeypatch.setattr(served.policy, "model", Forced(tokens, len(tokenizer), **options))
    return tokens


def _post(served: SimpleNamespace, **body: object) -> httpx.Response:
    return served.http.post("/v1/chat/completions", json={"model": NAME, "messages": ASK, **body}, headers=AUTH)


def _streamed(served: SimpleNamespace, **kwargs: object) -> tuple[str, str | None]:
    chunks = list(served.client.chat.completions.create(model=NAME, stream=True, **kwargs))
    return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason


def test_multibyte_characters_come_out_whole_streamed_and_not(served, monkeypatch):
    text = "😀 é 世界"
    generated = _force(served, monkeypatch, text)
    assert len(generated) > len(text) + 1  # the characters really are split over byte tokens
    whole = served.client.chat.completions.create(model=NAME, messages=ASK, max_tokens=40, temperature=0)
    assert (whole.choices[0].message.content, whole.choices[0].finish_reason) == (text, "stop")
    assert _streamed(served, messages=ASK, max_tokens=40, temperature=0) == (text, "stop")


def test_usage_counts_the_tokens_generated_not_a_retokenisation(served, monkeypatch):
    for seed in range(5):  # the real model at temperature 1 writes broken bytes that re-tokenise to more tokens
        reply = served.client.chat.completions.create(model=NAME, messages=ASK, max_tokens=4, temperature=1.0,
                                                      seed=seed)
        assert reply.usage.completion_tokens == 4 and reply.choices[0].finish_reason == "length"
    _force(served, monkeypatch, "😀 é 世界")
    reply = served.client.chat.completions.create(model=NAME, messages=ASK, max_tokens=5, temperature=0)
    assert reply.usage.completion_tokens == 5 and reply.usage.total_tokens == reply.usage.prompt_tokens + 5


def test_a_tiny_temperature_is_greedy_and_a_seed_outside_int64_is_a_422(served):
    greedy = _post(served, max_tokens=6, temperature=0).json()["choices"][0]["message"]["content"]
    for temperature in (1e-40, 1e-300):
        reply = _post(served, max_tokens=6, temperature=temperature)
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == greedy
        assert _streamed(served, messages=ASK, max_tokens=6, temperature=temperature)[0] == greedy
    for seed in (2**64, 2**63, -(2**63) - 1):
        assert _post(served, max_tokens=2, seed=seed).status_code == 422
        assert _post(served, max_tokens=2, seed=seed, stream=True).status_code == 422  # before any event
    assert _post(served, max_tokens=2, seed=2**63 - 1, n=3).status_code == 200  # seed + choice wraps round


def test_a_negative_seed_is_served_and_reproducible(served):
    """OpenAI's seed is any int64; clients that draw one at random send negative ones half the time."""
    def drawn(seed: int) -> list[str]:
        reply = _post(served, max_tokens=6, temperature=1.0, seed=seed, n=2)
        assert reply.status_code == 200, reply.text
        return [choice["message"]["content"] for choice in reply.json()["choices"]]

    assert drawn(-(2**63)) == drawn(-(2**63)) and drawn(-7) == drawn(-7)


def test_a_failure_mid_stream_is_an_error_event_not_a_quiet_end(served, monkeypatch):
    _force(served, monkeypatch, "hello world, a long reply", fail_at=3)
    raw = _post(served, max_tokens=20, temperature=0, stream=True)
    events = [line.removeprefix("data: ") for line in raw.text.splitlines() if line.startswith("data: ")]
    assert raw.status_code == 200 and "[DONE]" not in events
    assert json.loads(events[-1])["error"]["type"] == "server_error"
    with pytest.raises(openai.APIError, match="generation failed"):
        _streamed(served, messages=ASK, max_tokens=20, temperature=0)


def test_a_prompt_longer_than_the_context_is_a_400_naming_both_lengths(served):
    long = [{"role": "user", "content": "hello world " * 300}]
    for stream in (False, True):
        reply = _post(served, messages=long, max_tokens=4, stream=stream)
        assert reply.status_code == 400
        detail = reply.json()["detail"]
        assert "maximum context length is 512 tokens" in detail and "prompt tokens" in detail
    with pytest.raises(openai.BadRequestError, match="context length"):
        served.client.chat.completions.create(model=NAME, messages=long, max_tokens=4)


def test_a_reply_that_would_overflow_the_context_stops_there_with_length(served, monkeypatch):
    prompt = int(served.policy.prompt_ids(ASK).shape[1])
    tokenizer = served.policy.tokenizer
    _force(served, monkeypatch, tokens=tokenizer("a", add_special_tokens=False).input_ids, context=prompt + 3)
    reply = served.client.chat.completions.create(model=NAME, messages=ASK, max_tokens=10, temperature=0)
    assert (reply.usage.completion_tokens, reply.choices[0].finish_reason) == (3, "length")
    _force(served, monkeypatch, tokens=[0], context=prompt)  # not one token fits: refused, not an empty 200
    assert _post(served, max_tokens=10).status_code == 400


def test_stop_sequences_cut_the_reply_streamed_and_not(served, monkeypatch):
    _force(served, monkeypatch, "hello END world")
    for stop in (["END"], "END", ["zzz", "D w", "END"]):
        whole = served.client.chat.completions.create(model=NAME, messages=ASK, max_tokens=20, temperature=0,
                                                      stop=stop)
        assert (whole.choices[0].message.content, whole.choices[0].finish_reason) == ("hello ", "stop")
        chunks = list(served.client.chat.completions.create(model=NAME, messages=ASK, max_tokens=20, temperature=0,
                                                            stop=stop, stream=True))
        pieces = [c.choices[0].delta.content or "" for c in chunks]
        assert "".join(pieces) == "hello " and chunks[-1].choices[0].finish_reason == "stop"
    whole = served.client.chat.completions.create(model=NAME, messages=ASK, max_tokens=20, temperature=0, stop="EX")
    assert whole.choices[0].message.content == "hello END world"  # a held "E" that did not become "EX"
    assert _post(served, stop=["a", "b", "c", "d", "e"]).status_code == 422


def test_n_choices_each_with_its_own_index_and_seed(served):
    many = served.client.chat.completions.create(model=NAME, messages=ASK, max_tokens=6, temperature=1.0, seed=5,
                                                 n=3)
    assert [choice.index for choice in many.choices] == [0, 1, 2]
    singles = [served.client.chat.completions.create(model=NAME, messages=ASK, max_tokens=6, temperature=1.0,
                                                     seed=5 + i) for i in range(3)]
    assert [c.message.content for c in many.choices] == [s.choices[0].message.content for s in singles]
    assert many.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    streamed: dict[int, str] = {}
    for chunk in served.client.chat.completions.create(model=NAME, messages=ASK, max_tokens=6, temperature=1.0,
                                                       seed=5, n=3, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    assert [streamed[i] for i in range(3)] == [c.message.content for c in many.choices]
    assert _post(served, n=9).status_code == 422


def test_include_usage_adds_a_last_chunk_with_the_usage_and_no_choices(served):
    whole = served.client.chat.completions.create(model=NAME, messages=ASK, max_tokens=5, temperature=0)
    chunks = list(served.client.chat.completions.create(model=NAME, messages=ASK, max_tokens=5, temperature=0,
                                                        stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(chunk.usage is None for chunk in chunks[:-1])
    plain = list(served.client.chat.completions.create(model=NAME, messages=ASK, max_tokens=5, temperature=0,
                                                       stream=True))
    assert all(chunk.choices and chunk.usage is None for chunk in plain)


@pytest.mark.parametrize("unsupported", [
    {"logprobs": True}, {"top_logprobs": 2}, {"response_format": {"type": "json_object"}},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, {"tool_choice": "required"},
    {"functions": [{"name": "f", "parameters": {}}]},
])
def test_parameters_this_server_cannot_honour_are_a_clear_400(served, unsupported):
    for stream in (False, True):
        reply = _post(served, max_tokens=2, stream=stream, **unsupported)
        assert reply.status_code == 400 and "not supported" in reply.json()["detail"]


class Ranked(torch.nn.Module):
    """Stands in for the LM: the same next-token logits at every step, so what penalties and bias do is known."""

    def __init__(self, scores: dict[int, float], vocab: int) -> None:
        super().__init__()
        self.logits = torch.full((vocab,), -1e9)
        for token, score in scores.items():
            self.logits[token] = score
        self.config = SimpleNamespace(max_position_embeddings=512, vocab_size=vocab)

    def forward(self, input_ids: torch.Tensor, past_key_values: int | None = None,
                use_cache: bool = True) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits.expand(1, input_ids.shape[1], -1), past_key_values=0)


def test_penalties_and_logit_bias_change_the_reply_as_openai_defines_them(served, monkeypatch):
    tokenizer = served.policy.tokenizer
    x, y, z = (tokenizer(c, add_special_tokens=False).input_ids for c in "xyz")
    assert len(x) == len(y) == len(z) == 1
    scores = {x[0]: 3.0, y[0]: 2.0, z[0]: 1.5, tokenizer.eos_token_id: 0.5}
    monkeypatch.setattr(served.policy, "model", Ranked(scores, len(tokenizer)))

    def reply(**options: object) -> str:
        answer = _post(served, max_tokens=4, temperature=0, **options)
        assert answer.status_code == 200, answer.text
        return str(answer.json()["choices"][0]["message"]["content"])

    assert reply() == "xxxx"
    assert reply(presence_penalty=2) == "xyzx"  # x at 1 once used, y at 0, z at -0.5: the end of turn (0.5) wins
    assert reply(frequency_penalty=0.6) == "xxyx"  # x: 3, 2.4, 1.8 (< y's 2), then y at 1.4 < x's 1.8
    assert reply(logit_bias={str(y[0]): 100}) == "yyyy"
    assert reply(logit_bias={str(x[0]): -100}) == "yyyy"
    outside = _post(served, max_tokens=2, logit_bias={str(len(tokenizer) + 5): 1})
    assert outside.status_code == 400 and "outside this model's vocabulary" in outside.json()["detail"]
    for bad in ({"presence_penalty": 3}, {"logit_bias": {"x": 1}}, {"logit_bias": {"1": 101}}):
        assert _post(served, max_tokens=2, **bad).status_code == 422


def test_harmless_fields_clients_send_by_default_pass(served):
    harmless = {"user": None, "metadata": {"k": "v"}, "presence_penalty": 0, "frequency_penalty": 0,
                "logprobs": False, "response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
                "parallel_tool_calls": None, "store": False}
    assert _post(served, max_tokens=2, **harmless).status_code == 200


def test_nulls_content_parts_and_the_developer_role_are_accepted(served, monkeypatch):
    nulls = {"temperature": None, "top_p": None, "stream": None, "max_tokens": None, "max_completion_tokens": None,
             "n": None, "stop": None, "seed": None, "stream_options": None}
    assert _post(served, **nulls).status_code == 200

    def greedy(messages: list[dict[str, object]]) -> str | None:
        return served.client.chat.completions.create(model=NAME, messages=messages, max_tokens=6,
                                                     temperature=0).choices[0].message.content

    assert greedy([{"role": "user", "content": [{"type": "text", "text": "hi"}]}]) == greedy(ASK)
    parts = [{"type": "text", "text": "be"}, {"type": "text", "text": "brief"}]
    assert greedy([{"role": "system", "content": parts}, *ASK]) == greedy([{"role": "system", "content": "be\nbrief"},
                                                                            *ASK])
    assert greedy([{"role": "developer", "content": "be brief"}, *ASK]) == greedy([{"role": "system",
                                                                                      "content": "be brief"}, *ASK])
    image = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    reply = _post(served, messages=[{"role": "user", "content": image}])
    assert reply.status_code == 400 and "image_url" in reply.json()["detail"]


def test_an_assistant_refusal_in_the_history_is_its_words(served):
    """A client sends OpenAI's replies back as history: a refusal comes as a "refusal" part or field, not text."""
    def prompt(answer: dict[str, object]) -> tuple[int, str]:  # the tokens read, and the greedy reply to them
        reply = _post(served, max_tokens=6, temperature=0, messages=[*ASK, answer, *ASK])
        assert reply.status_code == 200, reply.text
        return reply.json()["usage"]["prompt_tokens"], reply.json()["choices"][0]["message"]["content"]

    said = prompt({"role": "assistant", "content": "I can't help with that."})
    assert prompt({"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't help with that."}]}) == said
    assert prompt({"role": "assistant", "content": None, "refusal": "I can't help with that."}) == said
    assert said[0] > prompt({"role": "assistant", "content": ""})[0]
    user_refusal = _post(served, messages=[{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}])
    assert user_refusal.status_code == 400 and "refusal" in user_refusal.json()["detail"]


def test_max_completion_tokens_is_max_tokens_by_its_newer_name(served, monkeypatch):
    _force(served, monkeypatch, tokens=served.policy.tokenizer("a", add_special_tokens=False).input_ids)
    reply = served.client.chat.completions.create(model=NAME, messages=ASK, max_completion_tokens=3, temperature=0)
    assert (reply.usage.completion_tokens, reply.choices[0].finish_reason) == (3, "length")


def test_a_lone_surrogate_in_the_body_is_a_422_not_a_500(served):
    """JSON can spell "\\ud800", which UTF-8 cannot encode: the 422 that echoes it back used to raise while encoding."""
    start = f'{{"model": "{NAME}", "messages": [{{"role": "user", "content": "hi'
    bodies = [start + '"}], "user": "bad\\ud800"}', start + ' \\ud800"}]}']
    for body in bodies:
        reply = served.http.post("/v1/chat/completions", content=body.encode(),
                                 headers={**AUTH, "content-type": "application/json"})
        assert reply.status_code == 422 and "\\\\ud800" in reply.text  # echoed, escaped
