"""The HTTP app: Label Studio webhook receiver and ML backend, and policy serving.

Run: `uvicorn proxyloop.http:app` (started by `proxyloop up`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from ground.settings import Settings, get_settings
from ingest.bus import make_producer
from ingest.labelstudio import router as labelstudio_router
from policies.ml_backend import ML_BACKEND_PREFIX
from policies.ml_backend import router as ml_backend_router
from policies.openai_api import router as openai_router
from policies.profile_api import router as profile_router
from policies.serve import router as serving_router


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.producer = make_producer(settings)
        try:
            yield
        finally:
            app.state.producer.close()

    app = FastAPI(title="proxyloop", lifespan=lifespan)
    app.dependency_overrides[get_settings] = lambda: settings  # every SettingsDep resolves these
    app.include_router(labelstudio_router)
    # Label Studio's ML-backend protocol (pre-annotations, acquisition scores); the webhook's secret.
    app.include_router(ml_backend_router, prefix=ML_BACKEND_PREFIX)
    app.include_router(serving_router)
    app.include_router(openai_router)
    app.include_router(profile_router)

    @app.middleware("http")
    async def limit_request_size(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_request_bytes:
            return JSONResponse({"detail": f"request body of {length} bytes exceeds the limit of "
                                 f"{settings.max_request_bytes} (PROXYLOOP_MAX_REQUEST_BYTES)"}, status_code=413)
        return await call_next(request)
    # Run artifacts (plots, reports) linked from Prefect's UI; read-only, no directory listing.
    settings.runs_dir.mkdir(parents=True, exist_ok=True)
    app.mount("/runs", StaticFiles(directory=settings.runs_dir), name="runs")

    @app.get("/health")
    def health() -> dict[str, str]:
        """Liveness probe."""
        return {"status": "ok"}

    return app


app = create_app()
