"""The HTTP app: Label Studio webhook receiver and ML backend, and policy serving.

Run: `uvicorn proxyloop.http:app` (started by `proxyloop up`).
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from kafka import KafkaProducer
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ground.settings import Settings, get_settings
from ingest.labelstudio import router as labelstudio_router
from ingest.labelstudio.webhook import broker_unavailable
from ingest.proxy_client import BrokerUnreachable, connect_producer
from ingest.web import app_producer, not_json
from policies.ml_backend import ML_BACKEND_PREFIX
from policies.ml_backend import router as ml_backend_router
from policies.openai_api import router as openai_router
from policies.openai_wire import error_response
from policies.profile_api import router as profile_router
from policies.serve import router as serving_router

LIMIT_SETTING = "PROXYLOOP_MAX_REQUEST_BYTES"
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # Prefect's UUIDs, and the ids tests and benches give
PLOT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\.png")


class RequestSizeLimit:
    """413 for a request body over `max_bytes`, counted on the bytes received, not only as declared.

    A Content-Length over the limit is answered before the app runs. A body without one (chunked) or
    with a false one is counted as the app reads it: once the count passes the limit, `receive` raises
    (an HTTPException, so a route that catches only ValueError still stops), and whatever the app then
    answers is replaced by the 413, provided it has not started answering; if it has, the exception
    goes on and the server drops the connection. Pure ASGI because it must wrap `receive`, which an
    `@app.middleware("http")` function never sees."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _detail(self, length: str | None = None) -> str:
        size = f"request body of {length} bytes" if length else "request body"
        return f"{size} exceeds the limit of {self.max_bytes} bytes ({LIMIT_SETTING})"

    def _too_large(self, length: str | None = None) -> JSONResponse:
        return error_response(413, self._detail(length), "request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._too_large(length)(scope, receive, send)
            return
        received, over, started = 0, False, False

        async def counted_receive() -> Message:
            nonlocal received, over
            if over:  # the app reads on after the refusal: refuse again, do not hand it more
                raise HTTPException(413, self._detail())
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over = True
                    raise HTTPException(413, self._detail())
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over and not started:
                return  # the app's own answer to the interrupted body (400, 422, 500...): the 413 replaces it
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not over or started:
                raise
        if over and not started:
            started = True
            await self._too_large()(scope, receive, send)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf": what the client sent, in a form JSON can carry
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:  # a lone surrogate ("\ud800" in the body's JSON): UTF-8 cannot carry it
            return value.encode(errors="backslashreplace").decode()
        return value
    if isinstance(value, dict):
        return {_json_safe(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


BODY = "request body"
FASTAPI_UNPARSED = "There was an error parsing the body"  # FastAPI's 400 when json.loads raises no JSONDecodeError


def _unparsed(message: str, error: dict[str, Any] | None = None) -> JSONResponse:
    """The 422 for a body that is not JSON, in FastAPI's shape of validation errors, with `message` in both."""
    detail = [{**(error or {"type": "json_invalid", "loc": ["body"], "input": {}}), "msg": message}]
    return error_response(422, detail, message=message)


def _decode_error(exc: RequestValidationError) -> JSONResponse | None:
    """FastAPI's 422 for a body that is not JSON said "6: JSON decode error" (param "6"): the decoder's reason and
    where it broke (line, column) instead, rebuilt from the error's position and the body FastAPI keeps."""
    for error in exc.errors():
        if isinstance(error, dict) and error.get("type") == "json_invalid":
            loc, reason = tuple(error.get("loc", ())), (error.get("ctx") or {}).get("error", "JSON decode error")
            position = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else 0
            body = exc.body if isinstance(exc.body, str) else ""
            return _unparsed(not_json(BODY, json.JSONDecodeError(str(reason), body, position)), error)
    return None


def _not_sent_as_json(request: Request, exc: RequestValidationError) -> JSONResponse | None:
    """A body sent without a JSON content type (curl's -d says form data) is not parsed at all, and FastAPI's 422
    said only "Input should be a valid dictionary" of JSON that was fine: say which header is missing instead."""
    kind = request.headers.get("content-type", "")
    if "json" in kind.lower() or not any(
            isinstance(e, dict) and tuple(e.get("loc", ())) == ("body",) for e in exc.errors()):
        return None
    return _unparsed(f"{BODY} must be JSON sent with 'Content-Type: application/json' (this request's content type: "
                     f"{kind or 'none'})", {"type": "content_type", "loc": ["body"], "input": {}})


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's own 422, but safe to encode: its errors echo the input, and a client's NaN or Infinity (which
    Python's JSON parser accepts) or a lone UTF-16 surrogate (which UTF-8 cannot encode) made the default answer's
    encoder raise, a 500 instead of the 422. A body that is not JSON: `_decode_error`; one not sent as JSON:
    `_not_sent_as_json`."""
    if isinstance(exc, RequestValidationError):
        unparsed = _decode_error(exc) or _not_sent_as_json(request, exc)
        if unparsed is not None:
            return unparsed
    errors = exc.errors() if isinstance(exc, RequestValidationError) else [str(exc)]
    located = [error for error in errors if isinstance(error, dict)]
    summary = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}"
                        for e in located[:3]) or "; ".join(str(e) for e in errors[:3])
    param = ".".join(str(p) for p in located[0].get("loc", ())[1:]) or None if located else None
    return error_response(422, _json_safe(jsonable_encoder(errors)), param=param, message=_json_safe(summary))


async def http_error(_: Request, exc: Exception) -> JSONResponse:
    """Starlette's HTTPException answer (the routes' 401/404/503s, an unknown path's 404) with the `error` object.
    FastAPI's generic 400 for a body that is not UTF-8 or nested too deeply becomes the 422 that says so, and where,
    as a body that does not parse gets on every route."""
    assert isinstance(exc, HTTPException)
    cause = exc.__cause__
    if exc.status_code == 400 and exc.detail == FASTAPI_UNPARSED and isinstance(cause, RecursionError | ValueError):
        return _unparsed(not_json(BODY, cause))
    return error_response(exc.status_code, exc.detail, headers=exc.headers)


RECONNECT_AFTER_S = 5.0  # a failed connect to Kafka is tried again no sooner (SharedProducer)


class SharedProducer:
    """The app's one Kafka producer, opened on first use, not at startup.

    Why: opening one needs a broker, and an app that opened it in its lifespan could not start while Kafka was
    away (kafka-python's bootstrap waits 30 s, then raises): serving, the OpenAI API and the ML backend, which
    never publish, went down with it. Now only the Label Studio webhook needs the broker; it answers 503 while
    none answers, and the next call after the broker is back opens the producer. The lock: routes call the getter
    (ingest.web.ProducerDep) in the thread pool, never on the event loop, and concurrent first calls must not open
    two producers.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings, self._lock = settings, threading.Lock()
        self._producer: KafkaProducer | None = None
        self._failed: tuple[float, BrokerUnreachable] | None = None  # the last failed connect, and when

    def get(self) -> KafkaProducer:
        """The producer; raises BrokerUnreachable (naming PROXYLOOP_KAFKA_BOOTSTRAP) while no broker answers. A
        connect that failed less than RECONNECT_AFTER_S ago fails again at once: a burst of webhooks against a broker
        that drops packets waited kafka_bootstrap_timeout_s each, in turn, holding threads serving shares."""
        with self._lock:
            if self._producer is not None:
                return self._producer
            if self._failed is not None and time.monotonic() - self._failed[0] < RECONNECT_AFTER_S:
                raise self._failed[1]
            try:
                self._producer = connect_producer(self._settings)
            except BrokerUnreachable as exc:
                self._failed = (time.monotonic(), exc)
                raise
            self._failed = None
            return self._producer

    def close(self) -> None:
        with self._lock:
            if self._producer is not None:
                self._producer.close()
                self._producer = None


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    producers = SharedProducer(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            producers.close()

    def producer() -> KafkaProducer:
        try:
            return producers.get()
        except BrokerUnreachable as exc:  # before anything is published: the label is not acknowledged
            raise broker_unavailable(str(exc)) from exc

    app = FastAPI(title="proxyloop", lifespan=lifespan)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.dependency_overrides[get_settings] = lambda: settings  # every SettingsDep resolves these
    app.dependency_overrides[app_producer] = lambda: producer  # every ProducerDep: opened on first publish
    app.include_router(labelstudio_router)
    # Label Studio's ML-backend protocol (pre-annotations, acquisition scores); the webhook's secret.
    app.include_router(ml_backend_router, prefix=ML_BACKEND_PREFIX)
    app.include_router(serving_router)
    app.include_router(openai_router)
    app.include_router(profile_router)

    app.add_middleware(RequestSizeLimit, max_bytes=settings.max_request_bytes)
    @app.get("/runs/{run_id}/{name}", include_in_schema=False)
    def run_plot(run_id: str, name: str) -> FileResponse:
        """A run's plot, as Prefect's UI links it (flows/artifacts.py). Plots only, only at the top of a run's folder:
        the folder also holds the run's training data and checkpoints, which a static mount served to anyone who
        had the URL (the HTTP audit: GET /runs/<id>/data/expert.jsonl, no key)."""
        path = settings.runs_dir / run_id / name
        if not (RUN_ID.fullmatch(run_id) and PLOT.fullmatch(name)) or not path.is_file():
            raise HTTPException(404, "no such run plot")
        return FileResponse(path, media_type="image/png")

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: what load balancers and uptime probes send
    def health() -> dict[str, str]:
        """Liveness probe."""
        return {"status": "ok"}

    return app


app = create_app()
