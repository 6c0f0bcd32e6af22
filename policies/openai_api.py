"""OpenAI-compatible chat completions for released language-model policies.

`model` is a registry reference (`name`, `name@alias`, `name@3`); the alias is resolved on every
request and models are cached by version, so a release or rollback is served without restart.
Unmodified OpenAI clients work: `OpenAI(base_url=".../v1", api_key=KEY)`.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy.orm import Session

from ground.settings import Settings
from ingest.web import SettingsDep
from policies.auth import ApiKey
from policies.http_errors import policy_error
from policies.lm.chat import ChatPolicy, TemplateRefused, load_chat_policy
from policies.loader import cached_by_version
from policies.openai_wire import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    Refused,
    Usage,
    unsupported,
)
from policies.profile import (
    USER_ID_PATTERN,
    BuildReport,
    build_messages,
    items_of,
    profile_config,
    profile_engine,
    sync_expert_labels,
)
from policies.registry import RegistryError
from policies.registry_remote import refresh

router = APIRouter(prefix="/v1", tags=["openai"])
log = logging.getLogger("proxyloop.serve")
PROFILE_HEADER = "X-Proxyloop-Profile"
PROFILE_FRAMING = 16  # tokens of the turn markers around a profile, beyond what the profile's text counts
_cache: dict[tuple[str, int], ChatPolicy] = {}


def chat_policy(settings: Settings, ref: str) -> ChatPolicy:
    try:
        refresh(settings, ref)
        return cached_by_version(settings.registry_dir, ref, _cache,
                                 lambda root, exact: load_chat_policy(root, exact, settings.serve_merge_lora))
    except RegistryError as exc:  # 404 for a name nobody released, 503 for a damaged registry (RegistryUnreadable)
        raise policy_error(exc.http_status, str(exc), ref, settings) from exc
    except FileNotFoundError as exc:  # a LoRA release whose base is not on this host: the server's to fix
        raise policy_error(503, str(exc), ref, settings) from exc
    except ValueError as exc:
        raise policy_error(400, str(exc), ref, settings) from exc


def _messages(body: ChatCompletionRequest) -> list[dict[str, str]]:
    """The messages as text; 400 for content this server cannot read (checked before any model is loaded)."""
    try:
        return [message.text() for message in body.messages]
    except ValueError as exc:
        raise Refused(str(exc), "messages") from exc


def profile_room(policy: ChatPolicy, messages: list[dict[str, str]], reply_tokens: int) -> int:
    """Tokens a profile may take: what the context leaves after the conversation, the reply (up to a quarter of the
    context) and PROFILE_FRAMING for the profile's own turn markers. A fixed budget pushed a conversation that fits
    alone past the context, and the request was refused for the client's messages."""
    conversation = int(policy.prompt_ids(messages).shape[1])
    return policy.context_limit - conversation - min(reply_tokens, policy.context_limit // 4) - PROFILE_FRAMING


def personalise(
    settings: Settings, policy: ChatPolicy, messages: list[dict[str, str]], user: str | None, reply_tokens: int = 0,
) -> tuple[list[dict[str, str]], BuildReport | None]:
    """With a `user`, put their profile into the context (paper 3), within the setting's budget and the room the
    conversation leaves (`profile_room`; none left: no profile); otherwise the messages as sent."""
    if not user:
        return messages, None
    config = profile_config(settings)
    if not re.fullmatch(USER_ID_PATTERN, user):  # a profile built under it could be neither listed nor erased
        log.warning("user %r: no profile (only ids /v1/users can address are personalised: %s)", user[:80],
                    USER_ID_PATTERN)
        return messages, BuildReport(position=config.position)
    room = min(config.budget_tokens, profile_room(policy, messages, reply_tokens))
    if room < 1:
        log.info("user %s: no room for a profile beside %d messages", user, len(messages))
        return messages, BuildReport(position=config.position)
    with Session(profile_engine(settings.resolved_store_url)) as session:
        sync_expert_labels(session, user)  # the user's own chosen responses, if they annotate
        session.commit()
        items = items_of(session, user)
        return build_messages(messages, items, replace(config, budget_tokens=room),
                              lambda text: len(policy.tokenizer(text).input_ids))


def _check_bias(policy: ChatPolicy, body: ChatCompletionRequest) -> None:
    """400 for a logit_bias naming a token the model does not have (it would fail mid-generation)."""
    outside = sorted(int(token) for token in body.logit_bias or {} if int(token) >= policy.vocab_size)
    if outside:
        raise Refused(f"logit_bias names token ids {outside[:5]} outside this model's vocabulary "
                      f"(0..{policy.vocab_size - 1})", "logit_bias")


def _prompt_tokens(policy: ChatPolicy, messages: list[dict[str, str]]) -> int:
    """The prompt's length in tokens; 400 when it leaves no room for a single generated token, so that the client
    hears why instead of getting an empty reply (a longer max_tokens is capped at the context, finish "length")."""
    tokens, limit = int(policy.prompt_ids(messages).shape[1]), policy.context_limit
    if tokens >= limit:
        raise Refused(f"This model's maximum context length is {limit} tokens, but the messages came to {tokens} "
                      "prompt tokens; shorten the messages.", "messages")
    return tokens


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _stream(policy: ChatPolicy, body: ChatCompletionRequest, messages: list[dict[str, str]], model: str,
            prompt_tokens: int) -> Iterator[str]:
    """Server-sent events as OpenAI sends them: the choices one after the other, each opened by a role chunk and
    closed by a finish chunk; with stream_options.include_usage every chunk has "usage": null and a last chunk
    with no choices has the usage. A failure after the headers went out is sent as an error event, which OpenAI
    clients raise, and the stream ends without [DONE]: never a stream that just stops and reads as complete."""
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    with_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choices: list[dict[str, Any]], usage: Usage | None = None) -> str:
        data: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                "model": model, "choices": choices}
        if with_usage:
            data["usage"] = usage.model_dump() if usage is not None else None
        return _event(data)

    def delta(index: int, content: dict[str, str], finish: str | None = None) -> str:
        return chunk([{"index": index, "delta": content, "finish_reason": finish}])

    completion_tokens = 0
    try:
        for index, sampling in enumerate(body.samplings()):
            yield delta(index, {"role": "assistant", "content": ""})
            for piece in policy.generate(messages, sampling):
                if piece.text:
                    yield delta(index, {"content": piece.text})
                if piece.finish:
                    completion_tokens += piece.completion_tokens
                    yield delta(index, {}, piece.finish)
    except Exception as exc:  # headers are sent: the status can no longer say it
        log.exception("chat stream %s failed after it started", completion_id)
        yield _event({"error": {"message": f"generation failed ({type(exc).__name__}); the server log has "
                                           f"{completion_id}", "type": "server_error", "param": None, "code": None}})
        return
    if with_usage:
        yield chunk([], Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                              total_tokens=prompt_tokens + completion_tokens))
    yield "data: [DONE]\n\n"


def _complete(policy: ChatPolicy, body: ChatCompletionRequest,
              messages: list[dict[str, str]]) -> tuple[list[Choice], int]:
    """Every choice's whole reply, and the tokens generated for all of them (what usage bills, as OpenAI's does)."""
    choices, completion_tokens = [], 0
    for index, sampling in enumerate(body.samplings()):
        pieces, finish = [], "length"
        for piece in policy.generate(messages, sampling):
            pieces.append(piece.text)
            if piece.finish:
                finish = piece.finish
                completion_tokens += piece.completion_tokens
        choices.append(Choice(index=index, message=AssistantMessage(content="".join(pieces)), finish_reason=finish))
    return choices, completion_tokens


@router.post("/chat/completions", response_model=ChatCompletion)
async def chat_completions(
    body: ChatCompletionRequest, settings: SettingsDep, _: ApiKey
) -> JSONResponse | StreamingResponse:
    """Chat completion from a released language-model policy (OpenAI wire format, optional SSE stream).

    Everything that can be refused is refused before a stream starts: unsupported parameters, unreadable content,
    an unknown model, a prompt longer than the context (schema limits, e.g. the seed's range, are 422s before this).
    """
    try:
        problem = unsupported(body)
        if problem is not None:
            raise problem
        asked = _messages(body)
        policy = await run_in_threadpool(chat_policy, settings, body.model)
        _check_bias(policy, body)
        reply_tokens = body.samplings()[0].max_tokens
        messages, report = await run_in_threadpool(personalise, settings, policy, asked, body.user, reply_tokens)
        prompt_tokens = await run_in_threadpool(_prompt_tokens, policy, messages)
    except Refused as refused:
        return refused.response()
    except TemplateRefused as exc:
        return Refused(str(exc), "messages").response()
    model = f"{policy.version.policy}@{policy.version.version}"
    headers = {PROFILE_HEADER: report.header_value()} if report is not None else {}
    if report is not None:
        log.info("user %s: profile %s", body.user, report.header_value())
    if body.stream:
        return StreamingResponse(_stream(policy, body, messages, model, prompt_tokens),
                                 media_type="text/event-stream", headers=headers)
    choices, completion_tokens = await run_in_threadpool(_complete, policy, body, messages)
    completion = ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model, choices=choices,
        usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    total_tokens=prompt_tokens + completion_tokens),
    )
    return JSONResponse(completion.model_dump(), headers=headers)
