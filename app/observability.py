"""Prometheus metrics and structured JSON logs with request and job ids."""

from __future__ import annotations

import json
import logging
import time
import uuid
from contextvars import ContextVar
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select

from modelpress.job_status import JobStatus

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
job_id_var: ContextVar[str | None] = ContextVar("job_id", default=None)

REGISTRY = CollectorRegistry()
REQUEST_LATENCY = Histogram(
    "modelpress_api_request_seconds", "API request latency", ["method", "route", "status"], registry=REGISTRY
)
UPLOAD_BYTES = Counter("modelpress_upload_bytes_total", "Bytes received in uploads", ["kind"], registry=REGISTRY)


class JobCollector:
    """Job counts, durations and queue depth read from the database at scrape time, so every
    API replica reports the same truth."""

    def collect(self) -> Any:
        from app.db import get_read_session_factory
        from app.tables import Job, OutboxMessage

        by_status = GaugeMetricFamily("modelpress_jobs", "Jobs by status and method", labels=["status", "method"])
        depth = GaugeMetricFamily("modelpress_queue_depth", "Queued jobs", labels=["queue"])
        unpublished = GaugeMetricFamily("modelpress_outbox_unpublished", "Outbox rows not yet published")
        duration = GaugeMetricFamily(
            "modelpress_job_duration_seconds_avg", "Mean duration of finished jobs", labels=["method", "status"]
        )
        try:
            with get_read_session_factory()() as session:
                for status, method, count in session.execute(
                    select(Job.status, Job.method, func.count()).group_by(Job.status, Job.method)
                ):
                    by_status.add_metric([status, method], count)
                for queue, count in session.execute(
                    select(Job.queue, func.count()).where(Job.status == JobStatus.QUEUED).group_by(Job.queue)
                ):
                    depth.add_metric([queue], count)
                unpublished.add_metric(
                    [],
                    session.scalar(
                        select(func.count()).select_from(OutboxMessage).where(OutboxMessage.published_at.is_(None))
                    )
                    or 0,
                )
                finished = session.execute(
                    select(Job.method, Job.status, Job.started_at, Job.finished_at)
                    .where(Job.finished_at.is_not(None), Job.started_at.is_not(None))
                    .order_by(Job.finished_at.desc())
                    .limit(1000)
                ).all()
                sums: dict[tuple[str, str], list[float]] = {}
                for method, job_status, started, ended in finished:
                    assert started is not None and ended is not None  # the query keeps started, finished jobs
                    sums.setdefault((method, job_status), []).append((ended - started).total_seconds())
                for (method_name, status_name), values in sums.items():
                    duration.add_metric([method_name, status_name], sum(values) / len(values))
        except Exception:  # a scrape must not fail because the database blinked
            pass
        yield from (by_status, depth, unpublished, duration)


REGISTRY.register(JobCollector())
JOB_DURATION = Histogram(
    "modelpress_job_seconds",
    "Job wall time seen by this process",
    ["method", "status"],
    buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
    registry=REGISTRY,
)


def render_metrics() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, var in (("request_id", request_id_var), ("job_id", job_id_var)):
            value = getattr(record, key, None) or var.get()
            if value:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class RequestMetrics:
    """ASGI middleware: request id header, latency histogram, one access log line."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.log = logging.getLogger("modelpress.access")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode() or uuid.uuid4().hex
        token = request_id_var.set(request_id)
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            REQUEST_LATENCY.labels(scope.get("method", ""), path, str(status)).observe(elapsed)
            self.log.info("%s %s %s %.1fms", scope.get("method"), scope.get("path"), status, elapsed * 1e3)
            request_id_var.reset(token)
