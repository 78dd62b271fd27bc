"""The job state machine: which status may follow which, and the one place a job's status is written.

Every change goes through `transition`: it checks the move against TRANSITIONS (an illegal one raises), makes
it a conditional UPDATE on the status it expects (and, after the claim, on the attempt number, so a stale run
whose lease was taken over can no longer change the job), and writes the job's "state" event in the same
transaction. Only the session's owner commits.

    queued  -> running (claim), cancelled (cancel before a worker took it)
    running -> succeeded, failed, cancelled (the runner's outcomes, or the reconciler after a lost lease),
               queued (requeued after a lost worker, while attempts remain)
    succeeded, failed, cancelled: terminal
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from app.tables import Job, JobEvent, utcnow
from modelpress.job_status import ACTIVE, TERMINAL, JobStatus

__all__ = [
    "ACTIVE",
    "INITIAL",
    "TERMINAL",
    "TRANSITIONS",
    "IllegalTransition",
    "JobAlreadyFinished",
    "JobStatus",
    "cancel",
    "check_transition",
    "claim",
    "end_cancelled",
    "end_lost_attempt",
    "fail",
    "record_created",
    "succeed",
    "transition",
]

TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED}),
    JobStatus.RUNNING: frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.QUEUED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}
INITIAL = JobStatus.QUEUED


class IllegalTransition(ValueError):
    """A move the state machine does not allow."""


class JobAlreadyFinished(IllegalTransition):
    """A request to change a job that has ended (a cancel after the end): the API answers 409."""


def check_transition(current: JobStatus, new: JobStatus) -> None:
    if new not in TRANSITIONS[current]:
        raise IllegalTransition(f"a job cannot go from {current} to {new}")


def transition(
    session: Session,
    job_id: str,
    *,
    current: JobStatus,
    new: JobStatus,
    fence_attempt: int | None = None,
    values: dict[str, Any] | None = None,
    event: dict[str, Any] | None = None,
) -> bool:
    """Move the job from `current` to `new` if it is still there (and still on `fence_attempt`, when given).

    Returns False when another writer moved it first (a claim race, a lease taken over): the caller's view
    is stale, and nothing was written. Objects of this session see the new values (ORM-enabled UPDATE).
    """
    check_transition(current, new)
    query = update(Job).where(Job.id == job_id, Job.status == current)
    if fence_attempt is not None:
        query = query.where(Job.attempt == fence_attempt)
    result = session.execute(query.values(status=new, **(values or {})))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    session.add(JobEvent(job_id=job_id, kind="state", data={"status": new.value, **(event or {})}))
    return True


def record_created(session: Session, job: Job) -> None:
    """The first state event of a job just inserted (in the INITIAL state)."""
    if job.status != INITIAL:
        raise IllegalTransition(f"a job starts {INITIAL}, not {job.status}")
    session.add(JobEvent(job_id=job.id, kind="state", data={"status": INITIAL.value}))


def claim(session: Session, job: Job, *, worker_name: str, lease_seconds: float) -> int | None:
    """queued -> running on the next attempt; returns that attempt, or None when another worker won."""
    attempt = job.attempt + 1
    values = {
        "attempt": attempt,
        "worker_name": worker_name,
        "stage": "starting",
        "lease_expires_at": utcnow() + timedelta(seconds=lease_seconds),
        "started_at": job.started_at or utcnow(),
    }
    claimed = transition(
        session,
        job.id,
        current=JobStatus.QUEUED,
        new=JobStatus.RUNNING,
        fence_attempt=job.attempt,
        values=values,
        event={"attempt": attempt},
    )
    return attempt if claimed else None


def succeed(session: Session, job_id: str, attempt: int) -> bool:
    """running -> succeeded; the caller adds the artifact and metrics rows in the same transaction."""
    values = {"progress": 1.0, "stage": "done", "finished_at": utcnow(), "lease_expires_at": None, "error": None}
    return transition(
        session, job_id, current=JobStatus.RUNNING, new=JobStatus.SUCCEEDED, fence_attempt=attempt, values=values
    )


def fail(session: Session, job_id: str, attempt: int, error: dict[str, str]) -> bool:
    """running -> failed: the job keeps the error's summary, its event the whole error (with the log)."""
    summary = {k: v for k, v in error.items() if k != "log"}
    values = {"error": summary, "finished_at": utcnow(), "lease_expires_at": None, "stage": JobStatus.FAILED.value}
    return transition(
        session,
        job_id,
        current=JobStatus.RUNNING,
        new=JobStatus.FAILED,
        fence_attempt=attempt,
        values=values,
        event={"error": error},
    )


def end_cancelled(session: Session, job_id: str, attempt: int) -> bool:
    """running -> cancelled: the runner stopped the sandbox on the cancel flag."""
    values = {"finished_at": utcnow(), "lease_expires_at": None, "stage": JobStatus.CANCELLED.value}
    return transition(
        session, job_id, current=JobStatus.RUNNING, new=JobStatus.CANCELLED, fence_attempt=attempt, values=values
    )


def cancel(session: Session, job: Job) -> None:
    """The API's cancel: a queued job ends cancelled at once; a running one gets the flag the runner polls."""
    if job.status in TERMINAL:
        raise JobAlreadyFinished(f"job {job.id} is already {job.status}")
    if job.status == JobStatus.QUEUED:
        values = {"finished_at": utcnow(), "stage": JobStatus.CANCELLED.value}
        if transition(session, job.id, current=JobStatus.QUEUED, new=JobStatus.CANCELLED, values=values):
            return
        session.refresh(job)  # a worker claimed it meanwhile: it is running now (or already done)
        if job.status in TERMINAL:
            raise JobAlreadyFinished(f"job {job.id} is already {job.status}")
    # the runner sees the flag within one epoch, stops the child and ends the job cancelled
    job.cancel_requested = True


def end_lost_attempt(session: Session, job: Job, *, max_attempts: int) -> JobStatus | None:
    """A running job whose worker stopped heartbeating: requeued while attempts remain, cancelled when a cancel
    was asked, failed at the attempt cap. Returns the new status, or None when a late heartbeat won the race."""
    values: dict[str, Any] = {"lease_expires_at": None}
    if job.attempt >= max_attempts:
        new = JobStatus.FAILED
        values["finished_at"] = utcnow()
        values["error"] = {
            "error": "WorkerLost",
            "detail": f"the worker stopped heartbeating on attempt {job.attempt} of {max_attempts}; giving up",
        }
    elif job.cancel_requested:
        new = JobStatus.CANCELLED
        values["finished_at"] = utcnow()
    else:
        new = JobStatus.QUEUED
        values["stage"] = "requeued after worker loss"
    moved = transition(
        session,
        job.id,
        current=JobStatus.RUNNING,
        new=new,
        fence_attempt=job.attempt,
        values=values,
        event={"reason": "lease expired"},
    )
    return new if moved else None
