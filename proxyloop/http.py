"""The HTTP app: Label Studio webhook receiver and policy serving.

Run: `uvicorn proxyloop.http:app` (started by `proxyloop up`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from ingest.bus import make_producer
from ingest.labelstudio import router as labelstudio_router
from policies.serve import router as serving_router
from proxyloop.settings import Settings, get_settings


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
    app.state.settings = settings
    app.include_router(labelstudio_router)
    app.include_router(serving_router)
    # Run artifacts (plots, reports) linked from Prefect's UI; read-only, no directory listing.
    settings.runs_dir.mkdir(parents=True, exist_ok=True)
    app.mount("/runs", StaticFiles(directory=settings.runs_dir), name="runs")

    @app.get("/health")
    def health() -> dict[str, str]:
        """Liveness probe."""
        return {"status": "ok"}

    return app


app = create_app()
