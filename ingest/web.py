"""What the HTTP routers of every layer share: the settings and Kafka producer dependencies, and reading a JSON body.

`create_app(settings)` binds `get_settings` to its own settings through `dependency_overrides`
(FastAPI's way), so routers never read `app.state` for them; the producer lives as long as the app.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from kafka import KafkaProducer

from ground.settings import Settings, get_settings

SettingsDep = Annotated[Settings, Depends(get_settings)]


def app_producer(request: Request) -> Callable[[], KafkaProducer]:
    """A getter of the app's one producer (`app.state.producer` of an app that mounts these routers itself), called
    only by a request that publishes: one that publishes nothing (a webhook action that is ignored) is answered while
    the broker is away, where Label Studio would count a 503 toward turning the webhook off. proxyloop.http overrides
    this dependency with a getter that opens the producer on first use (the app starts without a broker)."""
    return lambda: request.app.state.producer


ProducerDep = Annotated[Callable[[], KafkaProducer], Depends(app_producer)]


async def json_body(request: Request, what: str, empty: object = None) -> Any:
    """The body as JSON (`empty` when there is none); a body that does not parse is a 422, never a 500."""
    if empty is not None and not await request.body():
        return empty
    try:
        return await request.json()
    except (RecursionError, ValueError) as exc:
        raise HTTPException(422, not_json(what, exc)) from exc


def not_json(what: str, exc: RecursionError | ValueError) -> str:
    """Why `what` did not parse, saying where: the decoder's line and column, or the byte UTF-8 refused. Shared by
    every route, those reading their body here and those FastAPI parses (proxyloop.http), so each says it alike."""
    if isinstance(exc, RecursionError):  # json's parser recurses per nesting level: [[[[...]]]] exhausts the stack
        return f"{what} is JSON nested too deeply to parse"
    return f"{what} is not JSON: {exc}"  # not JSON (JSONDecodeError), or not UTF-8 (UnicodeDecodeError)
