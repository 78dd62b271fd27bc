"""Queries on jobs and the rows that hang off them (metrics, artifact, events)."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, select, update
from sqlalchemy.orm import Session

from app.errors import Invalid
from app.tables import Artifact, Job, JobEvent, JobMetrics, Tenant
from modelpress.job_status import ACTIVE, JobStatus

# a job with what a JobRead shows of its results: the metrics document and the artifact, outer-joined
JobRow = tuple[Job, dict[str, Any] | None, Artifact | None]


def _with_results() -> Select[tuple[Job, dict[str, Any], Artifact]]:
    return (
        select(Job, JobMetrics.document, Artifact)
        .outerjoin(JobMetrics, JobMetrics.job_id == Job.id)
        .outerjoin(Artifact, Artifact.job_id == Job.id)
    )


def by_idempotency_key(session: Session, *, tenant_id: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))


def lock_tenant(session: Session, *, tenant_id: str) -> None:
    """Serialise the tenant's submits (Postgres row lock; SQLite runs one writer at a time and ignores it)."""
    session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())


def count_active(session: Session, *, tenant_id: str | None = None, model_id: str | None = None) -> int:
    query = select(func.count()).select_from(Job).where(Job.status.in_(ACTIVE))
    if tenant_id is not None:
        query = query.where(Job.tenant_id == tenant_id)
    if model_id is not None:
        query = query.where(Job.model_id == model_id)
    return int(session.scalar(query) or 0)


def encode_cursor(job: Job) -> str:
    return cursor_after(job.created_at, job.id)


def cursor_after(created_at: datetime, job_id: str) -> str:
    """The opaque cursor of a page that ends with the job created at `created_at` with id `job_id`."""
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{job_id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        return datetime.fromisoformat(created), job_id
    except ValueError as error:
        raise Invalid("cursor is not one this API returned") from error


def cursor_position(session: Session, cursor: str | None) -> tuple[datetime, str] | None:
    """Where a page after `cursor` starts: (created_at, id) of the last job shown, in the database's terms
    (SQLite keeps naive datetimes)."""
    if not cursor:
        return None
    created, job_id = decode_cursor(cursor)
    if session.get_bind().dialect.name == "sqlite":
        created = created.replace(tzinfo=None)
    return created, job_id


def page(
    session: Session,
    *,
    tenant_id: str,
    status: JobStatus | None,
    model_id: str | None,
    method: str | None,
    limit: int,
    cursor: str | None,
) -> tuple[list[JobRow], str | None]:
    """A page of the tenant's jobs, newest first, each with its metrics document and artifact: one query
    whatever the page size (the joins are one-to-one: a job has at most one metrics row and one artifact)."""
    query = _with_results().where(Job.tenant_id == tenant_id)
    if status:
        query = query.where(Job.status == status)
    if model_id:
        query = query.where(Job.model_id == model_id)
    if method:
        query = query.where(Job.method == method)
    if (after := cursor_position(session, cursor)) is not None:
        created, job_id = after
        query = query.where((Job.created_at < created) | ((Job.created_at == created) & (Job.id < job_id)))
    rows = [
        (r[0], r[1], r[2])
        for r in session.execute(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1))
    ]
    next_cursor = encode_cursor(rows[limit - 1][0]) if len(rows) > limit else None
    return rows[:limit], next_cursor


def results_of(session: Session, *, job_id: str) -> tuple[dict[str, Any] | None, Artifact | None]:
    metrics = session.get(JobMetrics, job_id)
    return (metrics.document if metrics else None), artifact_of(session, job_id=job_id)


def artifact_of(session: Session, *, job_id: str) -> Artifact | None:
    return session.scalar(select(Artifact).where(Artifact.job_id == job_id))


def owned_by_ids(session: Session, *, tenant_id: str, job_ids: Sequence[str]) -> list[Job]:
    """The tenant's jobs among `job_ids`, in one query, in the order asked."""
    found = {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(job_ids), Job.tenant_id == tenant_id))}
    return [found[job_id] for job_id in job_ids if job_id in found]


def metrics_documents(session: Session, *, job_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    if not job_ids:
        return {}
    rows = session.execute(select(JobMetrics.job_id, JobMetrics.document).where(JobMetrics.job_id.in_(job_ids)))
    return {job_id: document for job_id, document in rows}


def events_after(session: Session, *, job_id: str, after: int, limit: int = 500) -> list[JobEvent]:
    query = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after).order_by(JobEvent.id).limit(limit)
    return list(session.scalars(query))


def events_of_kinds(session: Session, *, job_id: str, kinds: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    query = (
        select(JobEvent.kind, JobEvent.data)
        .where(JobEvent.job_id == job_id, JobEvent.kind.in_(kinds))
        .order_by(JobEvent.id)
    )
    return [(kind, data or {}) for kind, data in session.execute(query)]


def artifact_keys_of_model(session: Session, *, model_id: str) -> list[str]:
    query = select(Artifact.storage_key).join(Job, Job.id == Artifact.job_id).where(Job.model_id == model_id)
    return list(session.scalars(query))


def stale_queued(session: Session, *, before: datetime, limit: int = 100) -> list[Job]:
    query = select(Job).where(Job.status == JobStatus.QUEUED, Job.updated_at < before).limit(limit)
    return list(session.scalars(query).all())


def touch_if_unchanged(session: Session, job: Job, *, now: datetime) -> bool:
    """Mark a queued job as republished, unless another process touched it since it was read."""
    result = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == JobStatus.QUEUED, Job.updated_at == job.updated_at)
        .values(updated_at=now)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def expired_leases(session: Session, *, now: datetime, limit: int = 100) -> list[Job]:
    query = select(Job).where(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now).limit(limit)
    return list(session.scalars(query).all())


def update_running(session: Session, *, job_id: str, attempt: int, values: dict[str, Any]) -> bool:
    """Progress and lease of a running job, only while `attempt` is still its attempt (no status change)."""
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.attempt == attempt, Job.status == JobStatus.RUNNING).values(**values)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def cancel_requested(session: Session, *, job_id: str) -> bool:
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))
