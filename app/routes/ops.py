"""HTTP only: health, readiness, Prometheus metrics, the method catalogue, live workers."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.db import get_engine
from app.deps import SessionDep, TenantDep
from app.observability import render_metrics
from app.storage import get_store
from app.workers import live_devices as _live_devices
from app.workers import live_workers, stale_after_s
from modelpress.catalog import describe_methods

router = APIRouter()


@router.get("/healthz", summary="Process alive")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Database, broker and storage reachable")
def readyz() -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        with get_engine().connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as error:
        checks["database"] = f"unreachable: {type(error).__name__}"
    try:
        from app.queue import get_celery

        with get_celery().connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as error:
        checks["broker"] = f"unreachable: {type(error).__name__}"
    try:
        get_store().check()
        checks["storage"] = "ok"
    except Exception as error:
        checks["storage"] = f"unreachable: {type(error).__name__}"
    ready = all(v == "ok" for v in checks.values())
    if ready:
        return JSONResponse({"status": "ready", "checks": checks})
    return JSONResponse(
        {"error": "ServiceUnavailable", "detail": f"not ready: {checks}", "checks": checks},
        status_code=503,
        headers={"Retry-After": "5"},
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics() -> Response:
    body, content_type = render_metrics()
    return Response(body, media_type=content_type)


@router.get("/v1/methods", summary="Methods, schemes, options and devices this deployment supports")
def methods(session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    catalogue = describe_methods()
    workers = live_workers(session)
    live_devices = _live_devices(workers)
    catalogue["live_devices"] = live_devices
    for method in catalogue["methods"]:
        for scheme in method["schemes"]:
            scheme["runnable_now"] = any(d in live_devices for d in scheme["devices"])
    return catalogue


@router.get("/v1/workers", summary="Live workers and their capabilities")
def workers(session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    return {
        "items": [
            {
                "name": w.name,
                "queues": w.queues,
                "capabilities": w.capabilities,
                "started_at": w.started_at,
                "last_heartbeat": w.last_heartbeat,
            }
            for w in live_workers(session)
        ],
        "stale_after_s": stale_after_s(),
    }
