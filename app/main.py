"""The FastAPI application: routers, error handlers, middleware, background relay."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

import modelpress
from app.config import get_settings
from app.errors import install_error_handlers
from app.limits import BodySizeLimit
from app.observability import RequestMetrics
from app.outbox import BackgroundLoop, relay_once
from app.reconciler import reconcile_once
from app.routes import jobs, models, ops, reports
from app.uploads import SWEEP_INTERVAL_S, sweep_incoming

UI_DIR = Path(__file__).parent / "ui"
log = logging.getLogger(__name__)
RELAY_INTERVAL_S = 2.0


def _background_work() -> None:
    relay_once(min_age_s=1.0)
    reconcile_once()


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    try:
        sweep_incoming()  # partial uploads a crashed API process left behind
    except OSError:
        log.exception("could not sweep the uploads folder at start")
    loops = [
        BackgroundLoop("outbox-relay", RELAY_INTERVAL_S, _background_work),
        BackgroundLoop("incoming-sweep", SWEEP_INTERVAL_S, sweep_incoming),
    ]
    for loop in loops:
        loop.start()
    try:
        yield
    finally:
        for loop in loops:
            loop.stop()


def create_app() -> FastAPI:
    settings = get_settings()
    app = FastAPI(
        title="ModelPress",
        version=modelpress.__version__,  # the API path stays /v1; this is the release
        lifespan=lifespan,
        description="Upload a PyTorch model, prune / quantize / distill it, measure what was gained "
        "and lost, download a model that runs with stock PyTorch.",
    )
    install_error_handlers(app)
    # jobs first: the router tries routes in order, and the job reads clients poll are most of the traffic
    # (no path of one router overlaps another's, so the order changes nothing else)
    app.include_router(jobs.router)
    app.include_router(ops.router)
    app.include_router(models.router)
    app.include_router(reports.router)
    if UI_DIR.is_dir():
        app.mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui")
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["ETag", "X-Request-Id", "Retry-After"],
        )
    app.add_middleware(BodySizeLimit, max_bytes=lambda: get_settings().max_upload_bytes)
    app.add_middleware(RequestMetrics)
    return app


app = create_app()
