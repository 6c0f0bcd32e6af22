"""OpenAI's chat-completions wire format as this server reads and answers it: the request (with the limits a
client's request is held to), the reply, and the 400 for what the server cannot honour.

Apart from the route (policies/openai_api.py) because the wire format is a contract of its own that clients test
against (the official `openai` client in tests/policies/test_openai_api.py and test_chat_client_compat.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from policies.lm.decoding import Sampling

MAX_TOKENS_LIMIT = 512
DEFAULT_MAX_TOKENS = MAX_TOKENS_LIMIT  # none asked: as many as fit (OpenAI's default), capped at the context
MAX_CHOICES = 8


class ContentPart(BaseModel):
    """One part of a message's content in OpenAI's list form. "text" parts are served, and an assistant's "refusal"
    parts (its own words, which a client sends back in the history) as text (`ChatMessage.text`); other kinds
    (image_url, input_audio, ...) are parsed so that they get a 400 naming them rather than a schema error."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(max_length=64)
    text: str | None = Field(None, max_length=100_000)
    refusal: str | None = Field(None, max_length=100_000)

    def words(self) -> str | None:
        return self.refusal if self.type == "refusal" else self.text


Text = Annotated[str, Field(max_length=100_000)]
Parts = Annotated[list[ContentPart], Field(max_length=64)]


class ChatMessage(BaseModel):
    """A message as OpenAI's spec allows it: content a string or a list of parts, role "developer" (OpenAI's newer
    name for "system", which is what the chat template knows it as) included."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Text | Parts | None = None  # None: an assistant turn that made tool calls, or refused
    refusal: Text | None = None  # an assistant's refusal, as OpenAI's replies carry it beside a null content
    tool_calls: list[Any] | None = None  # declared so a tool-calling history is refused by name, not as a 422
    function_call: dict[str, Any] | None = None

    def text(self) -> dict[str, str]:
        """The message as the chat template takes it; text parts joined by newlines (as vLLM does). ValueError for
        other parts, and for a tool-calling history: this server reads text only."""
        role = "system" if self.role == "developer" else self.role
        if role in ("tool", "function"):
            raise ValueError(f"{role} messages (tool results) are not supported: this server does no tool calling")
        if self.tool_calls or self.function_call:
            raise ValueError("assistant messages with tool_calls or function_call are not supported: this server "
                             "does no tool calling")
        if self.content is None:
            if role != "assistant":
                raise ValueError(f"a {role} message needs content (a string or a list of text parts)")
            return {"role": role, "content": self.refusal or ""}
        if isinstance(self.content, str):
            return {"role": role, "content": self.content}
        served = {"text", "refusal"} if role == "assistant" else {"text"}
        other = sorted({part.type for part in self.content if part.type not in served})
        if other:
            raise ValueError(f"only text content parts are supported; this message has {', '.join(other)} parts")
        missing = sorted({part.type for part in self.content if part.words() is None})
        if missing:
            raise ValueError(f'a content part of type "{missing[0]}" needs a "{missing[0]}" field')
        return {"role": role, "content": "\n".join(part.words() or "" for part in self.content)}


TokenId = Annotated[str, Field(pattern=r"^[0-9]{1,9}$")]  # logit_bias's keys: a token id as JSON keys are, a string


class StreamOptions(BaseModel):
    include_usage: bool | None = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's request body. Optional fields take null as "default", as the spec allows; fields not declared here
    (metadata, store, ...) are ignored. Fields this server cannot honour are declared so that `unsupported`
    can refuse them with a 400 instead of answering as if they had been applied."""

    model: str = Field(min_length=1, max_length=200)
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)  # OpenAI's newer name for max_tokens
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    stop: Annotated[str, Field(min_length=1, max_length=200)] | Annotated[
        list[Annotated[str, Field(min_length=1, max_length=200)]], Field(max_length=4)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # OpenAI's int64
    user: str | None = Field(None, max_length=256)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[TokenId, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(None, max_length=1024)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None

    def samplings(self) -> list[Sampling]:
        """The decoding settings of each of the `n` choices; with a seed, choice i draws with seed + i so that the
        choices differ and each is reproducible, modulo 2**64: what torch.Generator.manual_seed takes, negative seeds
        (OpenAI allows any int64) included."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return [Sampling(max_tokens=self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS,
                         temperature=1.0 if self.temperature is None else self.temperature,
                         top_p=1.0 if self.top_p is None else self.top_p,
                         seed=None if self.seed is None else (self.seed + index) % 2**64, stop=stop,
                         presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
                         logit_bias=tuple((int(token), bias) for token, bias in (self.logit_bias or {}).items()))
                for index in range(self.n or 1)]


class Refused(Exception):
    """A request answered with 400. Its body has this app's usual `detail` and OpenAI's `error` object as well: the
    openai client puts only `error.message` into the exception it raises, so without it the user reads no reason."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param

    def response(self) -> JSONResponse:
        return error_response(400, self.message, param=self.param)


_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}


def error_response(status: int, detail: Any, code: str | None = None, param: str | None = None,
                   message: str | None = None, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """This app's `detail` beside OpenAI's `error` object, on every 4xx and 5xx: the openai SDKs (and LangChain,
    LiteLLM) read the reason from `error.message` only; without it their exception says just "Error code: 404"."""
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    error = {"message": message or str(detail), "type": kind, "param": param, "code": code}
    return JSONResponse({"detail": detail, "error": error}, status_code=status, headers=headers)


def unsupported(body: ChatCompletionRequest) -> Refused | None:
    """Why the request asks for something this server does not do, or None. A 400 beats an answer that silently
    lacks the log-probabilities, JSON mode or tool calls the client will go on to read."""
    if body.logprobs or body.top_logprobs:
        return Refused("logprobs and top_logprobs are not supported by this server; omit them or send "
                       "logprobs: false", "logprobs")
    if body.response_format is not None and body.response_format.get("type") != "text":
        return Refused(f"response_format {body.response_format.get('type')!r} is not supported by this server; "
                       'only {"type": "text"}', "response_format")
    # Tools offered with tool_choice "none" ask for a plain text reply (frameworks attach their tools to every call).
    if (body.tools and body.tool_choice != "none") or (body.functions and body.function_call != "none"):
        return Refused("tools and functions (tool calling) are not supported by this server; send tool_choice "
                       '"none" for a text reply', "tools")
    for name, choice in (("tool_choice", body.tool_choice), ("function_call", body.function_call)):
        if choice not in (None, "none", "auto"):
            return Refused(f"{name} {choice!r} asks for tool calling, which is not supported by this server", name)
    return None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
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
