"""HTTP only: jobs, their events and artifacts."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from app import jobs as service
from app.db import get_read_session_factory, session_scope
from app.deps import SessionDep, TenantDep, get_tenant
from app.errors import ArtifactCorrupted, Conflict
from app.outbox import publish_now
from app.schemas import ErrorBody, JobCreate, JobList, JobRead, JobStatus
from app.storage import get_store
from app.tables import Artifact, Job, JobEvent
from modelpress.catalog import ARTIFACT_EXTENSIONS

ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (401, 404, 409, 422, 429)}
router = APIRouter(prefix="/v1", responses=ERRORS)


@router.post(
    "/jobs",
    status_code=202,
    response_model=JobRead,
    summary="Submit a compression job",
    description="Validated at once against the catalogue (422 with the reason when it cannot run). "
    "An `Idempotency-Key` header replays the first answer for the same body.",
)
def submit_job(
    job_in: JobCreate,
    session: SessionDep,
    tenant: TenantDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobRead:
    job, outbox_id = service.create_job(session, tenant=tenant, job_in=job_in, idempotency_key=idempotency_key)
    session.commit()  # the job and its outbox row, together; publish only after the commit
    if outbox_id is not None:
        publish_now(outbox_id)
    else:
        response.headers["Idempotent-Replayed"] = "true"
    return service.job_read(session, job)


# The two reads clients poll are async endpoints that make one hop to a worker thread for the key check, the
# rate limit and the query together: as sync endpoints with the session and tenant dependencies they took
# four (session in, tenant, endpoint, response validation; plus the session's exit), each a thread handoff
# that cost more than the query on a busy 2-core box (bench readpath).
AuthorizationHeader = Annotated[str | None, Header()]


@router.get(
    "/jobs",
    response_model=JobList,
    summary="List jobs",
    description="Newest first; filter by status, model_id and method; page with limit and cursor.",
)
async def list_jobs(
    request: Request,
    status: JobStatus | None = None,
    model_id: str | None = None,
    method: str | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
    authorization: AuthorizationHeader = None,
) -> Response:
    def read() -> Response:
        with session_scope(read_only=True) as session:
            tenant = get_tenant(request, session, authorization)
            items, next_cursor = service.list_job_reads(
                session, tenant, status=status, model_id=model_id, method=method, limit=limit, cursor=cursor
            )
        return _json(JobList(items=items, next_cursor=next_cursor))

    return await run_in_threadpool(read)


@router.get("/jobs/{job_id}", response_model=JobRead, summary="Get a job with its metrics")
async def read_job(job_id: str, request: Request, authorization: AuthorizationHeader = None) -> Response:
    def read() -> Response:
        with session_scope(read_only=True) as session:
            job = service.read_job(session, get_tenant(request, session, authorization), job_id)
        return _json(job)

    return await run_in_threadpool(read)


def _json(model: JobRead | JobList) -> Response:
    """The model as JSON in one pass of pydantic's serializer (the shape response_model documents): FastAPI's
    own path dumps, validates again and dumps once more, which on a page of jobs with their metrics documents
    cost more than the query."""
    return Response(content=model.model_dump_json(), media_type="application/json")


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=JobRead,
    summary="Cancel a job",
    description="A queued job ends cancelled at once; a running one within one epoch. 409 when finished.",
)
def cancel_job(job_id: str, session: SessionDep, tenant: TenantDep) -> JobRead:
    job = service.cancel_job(session, tenant, job_id)
    return service.job_read(session, job)


@router.get(
    "/jobs/{job_id}/artifact",
    summary="Download the compressed model",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, 304: {"description": "not modified"}},
)
def download_artifact(
    job_id: str, session: SessionDep, tenant: TenantDep, if_none_match: Annotated[str | None, Header()] = None
) -> Response:
    job = service.get_job(session, tenant, job_id)
    artifact = session.scalar(select(Artifact).where(Artifact.job_id == job.id))
    if artifact is None:
        raise Conflict(f"job {job_id} has no artifact (status {job.status})")
    etag = f'"{artifact.sha256}"'
    session.commit()  # no transaction stays open while the file streams
    if if_none_match == etag:
        return Response(status_code=304, headers={"ETag": etag})
    verify_stored_digest(artifact.storage_key, artifact.sha256)
    extension = ARTIFACT_EXTENSIONS.get(artifact.format, "bin")
    return StreamingResponse(
        get_store().iter_bytes(artifact.storage_key),
        media_type="application/octet-stream",
        headers={
            "ETag": etag,
            "Content-Length": str(artifact.size_bytes),
            "X-Artifact-Format": artifact.format,
            "Content-Disposition": f'attachment; filename="{job.id}.{extension}"',
        },
    )


def verify_stored_digest(key: str, expected: str) -> None:
    """Refuse to serve an artifact whose bytes no longer match the sha256 recorded when it was made."""
    digest = hashlib.sha256()
    for chunk in get_store().iter_bytes(key):
        digest.update(chunk)
    if digest.hexdigest() != expected:
        raise ArtifactCorrupted(
            f"the stored artifact's sha256 is {digest.hexdigest()}, not the {expected} "
            "recorded when it was made; it will not be served"
        )


@router.get(
    "/jobs/{job_id}/events",
    summary="Server-Sent Events of a job",
    description="State changes, progress, per-epoch training figures and log lines; ends with the job.",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def job_events(
    job_id: str,
    request: Request,
    session: SessionDep,
    tenant: TenantDep,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    service.get_job(session, tenant, job_id)
    session.commit()  # the stream reads with short sessions of its own
    start = int(last_event_id) if last_event_id and last_event_id.isdigit() else 0
    return StreamingResponse(
        _event_stream(job_id, start, request),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _read_events(job_id: str, after: int) -> tuple[list[JobEvent], str, float, str | None]:
    with get_read_session_factory()() as session:
        events = list(
            session.scalars(
                select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after).order_by(JobEvent.id).limit(500)
            )
        )
        job = session.get(Job, job_id)
        assert job is not None
        return events, job.status, job.progress, job.stage


async def _event_stream(job_id: str, after: int, request: Request) -> AsyncIterator[bytes]:
    last_progress: tuple[float, str | None] | None = None
    idle = 0
    while True:
        events, status, progress, stage = await asyncio.to_thread(_read_events, job_id, after)
        for event in events:
            after = event.id
            yield f"id: {event.id}\nevent: {event.kind}\ndata: {json.dumps(event.data)}\n\n".encode()
        if (progress, stage) != last_progress:
            last_progress = (progress, stage)
            yield f"event: progress\ndata: {json.dumps({'progress': progress, 'stage': stage})}\n\n".encode()
        if status in service.TERMINAL and not events:
            yield f"event: end\ndata: {json.dumps({'status': status})}\n\n".encode()
            return
        idle = 0 if events else idle + 1
        if idle and idle % 30 == 0:
            yield b": keep-alive\n\n"
        if await request.is_disconnected():
            return
        await asyncio.sleep(0.5)
