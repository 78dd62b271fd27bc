"""The read model of the two endpoints clients poll: GET /v1/jobs/{id} and GET /v1/jobs.

One Core SELECT of the columns the answer shows (no ORM objects, no identity map, no lazy loads), statements
built once at import, and JobRead built with model_construct: the rows come from our own tables, so
validating every nested key of spec and metrics again on each poll bought nothing. Profiled under wrk
(bench readpath), the ORM path (31 columns described and loaded into three mapped objects per row, the
statement rebuilt per request) and that validation were the largest costs of a read after the key check.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import Row, Select, bindparam, select
from sqlalchemy.orm import Session

from app.errors import NotFound
from app.schemas import ArtifactRead, JobRead
from app.tables import Artifact, Job, JobMetrics

_COLUMNS = (
    Job.id,
    Job.status,
    Job.progress,
    Job.stage,
    Job.spec,
    Job.error,
    Job.attempt,
    Job.created_at,
    Job.started_at,
    Job.finished_at,
    JobMetrics.document,
    Artifact.size_bytes,
    Artifact.sha256,
    Artifact.format,
    Artifact.requires,
)
_READ_BASE: Select[Any] = (
    select(*_COLUMNS).outerjoin(JobMetrics, JobMetrics.job_id == Job.id).outerjoin(Artifact, Artifact.job_id == Job.id)
)
_READ_ONE = _READ_BASE.where(Job.id == bindparam("job_id"), Job.tenant_id == bindparam("tenant_id"))
_LIST_PAGE = _READ_BASE.where(Job.tenant_id == bindparam("tenant_id"))


def read_job(session: Session, tenant_id: str, job_id: str) -> JobRead:
    """The tenant's job with its metrics and artifact; another tenant's job is as absent as a missing one."""
    row = session.connection().execute(_READ_ONE, {"job_id": job_id, "tenant_id": tenant_id}).first()
    if row is None:
        raise NotFound(f"no job {job_id!r}")
    return job_read_from_row(row)


def list_page(
    session: Session,
    tenant_id: str,
    *,
    status: str | None,
    model_id: str | None,
    method: str | None,
    after: tuple[datetime, str] | None,
    limit: int,
) -> Sequence[Row[Any]]:
    """A page of the tenant's jobs, newest first, with one row more than `limit` to tell whether another page
    follows. `after` is the (created_at, id) of the last job of the previous page."""
    # an empty filter is no filter, as it always was
    statement = _page_statement(bool(status), bool(model_id), bool(method), after is not None)
    params: dict[str, Any] = {"tenant_id": tenant_id, "limit": limit + 1}
    params.update(
        {name: value for name, value in (("status", status), ("model_id", model_id), ("method", method)) if value}
    )
    if after is not None:
        params.update(after_created=after[0], after_id=after[1])
    return session.connection().execute(statement, params).all()


@lru_cache(maxsize=16)
def _page_statement(status: bool, model_id: bool, method: bool, after: bool) -> Select[Any]:
    """One statement per combination of filters, built once: a statement built per request cost more CPU than
    running it (SQLAlchemy's coercions and cache key walk)."""
    query = _LIST_PAGE
    if status:
        query = query.where(Job.status == bindparam("status"))
    if model_id:
        query = query.where(Job.model_id == bindparam("model_id"))
    if method:
        query = query.where(Job.method == bindparam("method"))
    if after:
        created = bindparam("after_created", type_=Job.created_at.type)
        job_id = bindparam("after_id", type_=Job.id.type)
        query = query.where((Job.created_at < created) | ((Job.created_at == created) & (Job.id < job_id)))
    return query.order_by(Job.created_at.desc(), Job.id.desc()).limit(bindparam("limit"))


def job_reads_from_rows(rows: Sequence[Row[Any]]) -> list[JobRead]:
    return [job_read_from_row(row) for row in rows]


def job_read_from_row(row: Sequence[Any]) -> JobRead:
    (
        job_id,
        status,
        progress,
        stage,
        spec,
        error,
        attempt,
        created_at,
        started_at,
        finished_at,
        metrics,
        size_bytes,
        sha256,
        artifact_format,
        requires,
    ) = row
    artifact = (
        ArtifactRead.model_construct(
            size_bytes=size_bytes,
            sha256=sha256,
            format=artifact_format,
            requires=requires or [],
            download_url=f"/v1/jobs/{job_id}/artifact",
        )
        if size_bytes is not None
        else None
    )
    return JobRead.model_construct(
        id=job_id,
        status=status,
        progress=progress,
        stage=stage,
        spec=spec,
        error=error,
        attempt=attempt,
        created_at=created_at,
        started_at=started_at,
        finished_at=finished_at,
        metrics=metrics,
        artifact=artifact,
    )
