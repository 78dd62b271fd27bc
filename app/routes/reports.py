"""HTTP only: a job's report (HTML), its charts (SVG in JSON) and the comparison of a model's jobs."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from app import jobs as service
from app.deps import SessionDep, TenantDep
from app.errors import Invalid, NotFound
from app.job_states import TERMINAL, JobStatus
from app.repositories import jobs as jobs_repo
from app.resources import get_model
from app.schemas import ErrorBody
from app.tables import Job, JobMetrics

ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (401, 404, 422, 429)}
router = APIRouter(prefix="/v1", responses=ERRORS)
MAX_COMPARED = 20
CACHED_JOBS = 64


class ChartRead(BaseModel):
    name: str = Field(
        examples=["trials"],
        description="trials, layer-sparsity, layer-bits, sensitivity, pruning-sensitivity, training or compare",
    )
    title: str
    svg: str = Field(description="a standalone <svg> element (matplotlib), no external references")


class JobCharts(BaseModel):
    job_id: str
    charts: list[ChartRead]


class CompareRead(BaseModel):
    model_id: str
    rows: list[dict[str, Any]] = Field(
        description="one per job, in the order asked: job_id, status, stages, "
        "size_bytes, compression_ratio, latency_ms_p50, speedup, speed_verdict, "
        "sqnr_db, top1_agreement, accuracy, accuracy_drop, sparsity, "
        "warnings and the original's size, latency and accuracy"
    )
    charts: list[ChartRead] = Field(
        default_factory=list, description="with chart=true: one size / latency vs accuracy (or SQNR) scatter"
    )


class _ChartCache:
    """Charts of finished jobs never change: keep the last few rendered (matplotlib takes ~0.5 s a job)."""

    def __init__(self, size: int) -> None:
        self.size, self.lock, self.items = size, threading.Lock(), OrderedDict[tuple[str, str], list[Any]]()

    def get(self, key: tuple[str, str]) -> list[Any] | None:
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        return None

    def put(self, key: tuple[str, str], charts: list[Any]) -> None:
        with self.lock:
            self.items[key] = charts
            while len(self.items) > self.size:
                self.items.popitem(last=False)


_cache = _ChartCache(CACHED_JOBS)


def _events(session: Session, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    return jobs_repo.events_of_kinds(session, job_id=job_id, kinds=("epoch", "trial"))


def _charts(session: Session, job: Job, metrics: dict[str, Any] | None) -> list[Any]:
    from app.report import job_charts

    key = (job.id, str(job.finished_at))
    cached = _cache.get(key) if job.status in TERMINAL else None
    if cached is not None:
        return cached
    charts = job_charts(metrics, _events(session, job.id))
    if job.status in TERMINAL:
        _cache.put(key, charts)
    return charts


@router.get(
    "/jobs/{job_id}/report",
    response_class=HTMLResponse,
    summary="A job's report as one HTML page",
    description="Self-contained (inline CSS and SVG charts, no external URL): before/after table, "
    "warnings, per-layer sparsity and bit widths, sensitivity, search trials with the "
    "Pareto front, training curves, environment and spec. `download=true` adds "
    "Content-Disposition: attachment.",
    responses={
        200: {"content": {"text/html": {}}},
        # errors stay JSON bodies even on this HTML route
        **{
            code: {
                "model": ErrorBody,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
            }
            for code in ERRORS
        },
    },
)
def job_report(job_id: str, session: SessionDep, tenant: TenantDep, download: bool = False) -> HTMLResponse:
    from app.report.page import render

    job = service.get_job(session, tenant, job_id)
    read = service.job_read(session, job).model_dump()
    read["worker_name"] = job.worker_name
    charts = _charts(session, job, read["metrics"])
    session.commit()
    headers = {"Content-Disposition": f'attachment; filename="{job.id}-report.html"'} if download else {}
    # the page inlines everything; forbid it from loading anything even if a chart ever tried to
    headers["Content-Security-Policy"] = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
    return HTMLResponse(render(read, charts), headers=headers)


@router.get(
    "/jobs/{job_id}/charts",
    response_model=JobCharts,
    summary="A job's report charts as SVG",
    description="The charts of the job report, for the dashboard: each a standalone <svg> element.",
)
def job_charts_route(job_id: str, session: SessionDep, tenant: TenantDep) -> JobCharts:
    job = service.get_job(session, tenant, job_id)
    metrics = session.get(JobMetrics, job.id)
    charts = _charts(session, job, metrics.document if metrics else None)
    return JobCharts(job_id=job.id, charts=[ChartRead(**c.as_dict()) for c in charts])


@router.get(
    "/models/{model_id}/jobs/compare",
    response_model=CompareRead,
    summary="Compare jobs of one model",
    description=f"`ids`: comma-separated job ids (at most {MAX_COMPARED}), all of this model; without "
    f"it, the model's {MAX_COMPARED} newest succeeded jobs. `chart=true` adds a scatter.",
)
def compare_jobs(
    model_id: str,
    session: SessionDep,
    tenant: TenantDep,
    ids: Annotated[str | None, Query(max_length=2000)] = None,
    chart: bool = False,
) -> CompareRead:
    from app.report.content import compare_row

    model = get_model(session, tenant, model_id)
    if ids:
        wanted = list(dict.fromkeys(i.strip() for i in ids.split(",") if i.strip()))
        if len(wanted) > MAX_COMPARED:
            raise Invalid(f"compare at most {MAX_COMPARED} jobs at once, got {len(wanted)}")
        jobs = jobs_repo.owned_by_ids(session, tenant_id=tenant.id, job_ids=wanted)
        if missing := [job_id for job_id in wanted if job_id not in {j.id for j in jobs}]:
            raise NotFound(f"no job {missing[0]!r}")
        others = [j.id for j in jobs if j.model_id != model.id]
        if others:
            raise Invalid(f"jobs {others} are not jobs of model {model.id}")
    else:
        jobs, _ = service.list_jobs(
            session, tenant, status=JobStatus.SUCCEEDED, model_id=model.id, method=None, limit=MAX_COMPARED, cursor=None
        )
    documents = jobs_repo.metrics_documents(session, job_ids=[j.id for j in jobs])
    rows = [compare_row(j.id, j.status, j.spec, documents.get(j.id)) for j in jobs]
    charts: list[ChartRead] = []
    if chart and any(r["size_bytes"] is not None for r in rows):
        from app.report import compare_chart

        charts.append(ChartRead(**compare_chart(rows).as_dict()))
    return CompareRead(model_id=model.id, rows=rows, charts=charts)
