"""OpenAI-compatible chat completions for released language-model policies.

`model` is a registry reference (`name`, `name@alias`, `name@3`); the alias is resolved on every
request and models are cached by version, so a release or rollback is served without restart.
Unmodified OpenAI clients work: `OpenAI(base_url=".../v1", api_key=KEY)`.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Literal

from fastapi import APIRouter, HTTPException
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from ground.settings import Settings
from ingest.web import SettingsDep
from policies.auth import ApiKey
from policies.lm.chat import ChatPolicy, load_chat_policy
from policies.loader import cached_by_version
from policies.profile import (
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
MAX_TOKENS_LIMIT = 512


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=100_000)


class ChatCompletionRequest(BaseModel):
    model: str = Field(min_length=1, max_length=200)
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    stream: bool = False
    seed: int | None = None
    user: str | None = Field(None, max_length=256)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


_cache: dict[tuple[str, int], ChatPolicy] = {}


def chat_policy(settings: Settings, ref: str) -> ChatPolicy:
    try:
        refresh(settings, ref)
        return cached_by_version(settings.registry_dir, ref, _cache,
                                 lambda root, exact: load_chat_policy(root, exact, settings.serve_merge_lora))
    except RegistryError as exc:
        raise HTTPException(404, str(exc)) from exc
    except FileNotFoundError as exc:  # a LoRA release whose base is not on this host: the server's to fix
        raise HTTPException(503, str(exc)) from exc
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from exc


def _messages(body: ChatCompletionRequest) -> list[dict[str, str]]:
    return [m.model_dump() for m in body.messages]


def _chunk(completion_id: str, created: int, model: str, delta: dict[str, str], finish: str | None) -> str:
    chunk = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(chunk)}\n\n"


def personalise(
    settings: Settings, policy: ChatPolicy, body: ChatCompletionRequest
) -> tuple[list[dict[str, str]], BuildReport | None]:
    """With a `user`, put their profile into the context (paper 3); otherwise the messages as sent."""
    messages = _messages(body)
    if not body.user:
        return messages, None
    with Session(profile_engine(settings.resolved_store_url)) as session:
        sync_expert_labels(session, body.user)  # the user's own chosen responses, if they annotate
        session.commit()
        items = items_of(session, body.user)
        return build_messages(messages, items, profile_config(settings),
                              lambda text: len(policy.tokenizer(text).input_ids))


def _stream(
    policy: ChatPolicy, body: ChatCompletionRequest, messages: list[dict[str, str]], max_tokens: int, model: str
) -> Iterator[str]:
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    yield _chunk(completion_id, created, model, {"role": "assistant", "content": ""}, None)
    for piece, finish in policy.stream(messages, max_tokens, body.temperature, body.seed):
        if piece:
            yield _chunk(completion_id, created, model, {"content": piece}, None)
        if finish:
            yield _chunk(completion_id, created, model, {}, finish)
    yield "data: [DONE]\n\n"


@router.post("/chat/completions", response_model=ChatCompletion)
async def chat_completions(
    body: ChatCompletionRequest, settings: SettingsDep, _: ApiKey
) -> JSONResponse | StreamingResponse:
    """Chat completion from a released language-model policy (OpenAI wire format, optional SSE stream)."""
    policy = await run_in_threadpool(chat_policy, settings, body.model)
    max_tokens = body.max_completion_tokens or body.max_tokens or 64
    model = f"{policy.version.policy}@{policy.version.version}"
    messages, report = await run_in_threadpool(personalise, settings, policy, body)
    headers = {PROFILE_HEADER: report.header_value()} if report is not None else {}
    if report is not None:
        log.info("user %s: profile %s", body.user, report.header_value())
    if body.stream:
        return StreamingResponse(_stream(policy, body, messages, max_tokens, model),
                                 media_type="text/event-stream", headers=headers)

    def complete() -> tuple[str, str, int]:
        pieces, finish = [], "length"
        for piece, done in policy.stream(messages, max_tokens, body.temperature, body.seed):
            pieces.append(piece)
            finish = done or finish
        text = "".join(pieces)
        return text, finish, len(policy.tokenizer(text).input_ids)

    text, finish, completion_tokens = await run_in_threadpool(complete)
    prompt_tokens = int(policy.prompt_ids(messages).shape[1])
    completion = ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model,
        choices=[Choice(message=AssistantMessage(content=text), finish_reason=finish)],
        usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    total_tokens=prompt_tokens + completion_tokens),
    )
    return JSONResponse(completion.model_dump(), headers=headers)
