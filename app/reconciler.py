"""Requeue jobs whose worker stopped heartbeating; fail them after the attempt cap."""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import select, update

from app.config import get_settings
from app.db import session_scope
from app.outbox import enqueue
from app.queue import RUN_JOB
from app.tables import Job, JobEvent, utcnow

log = logging.getLogger("modelpress.reconciler")


def republish_stale_queued() -> int:
    """Publish again jobs queued for long without a worker claiming them.

    A broker that restarted without persistence loses its messages; the job row
    is the truth, and a duplicate message is harmless (only a queued job can be claimed).
    """
    settings = get_settings()
    cutoff = utcnow() - timedelta(seconds=settings.requeue_queued_after_s)
    touched = 0
    with session_scope() as session:
        stale = session.scalars(select(Job).where(Job.status == "queued", Job.updated_at < cutoff).limit(100)).all()
        for job in stale:
            result = session.execute(
                update(Job)
                .where(Job.id == job.id, Job.status == "queued", Job.updated_at == job.updated_at)
                .values(updated_at=utcnow())
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                continue
            enqueue(session, task=RUN_JOB, object_id=job.id, queue=job.queue, priority=job.priority)
            touched += 1
            log.warning(
                "job %s queued for over %s s without a worker claiming it: published again",
                job.id,
                settings.requeue_queued_after_s,
            )
    return touched


def reconcile_once() -> int:
    """Handle running jobs whose lease expired, and long-queued jobs; returns how many were touched."""
    settings = get_settings()
    touched = republish_stale_queued()
    with session_scope() as session:
        expired = session.scalars(
            select(Job).where(Job.status == "running", Job.lease_expires_at < utcnow()).limit(100)
        ).all()
        for job in expired:
            if job.attempt >= settings.max_attempts:
                new_values = {
                    "status": "failed",
                    "finished_at": utcnow(),
                    "lease_expires_at": None,
                    "error": {
                        "error": "WorkerLost",
                        "detail": f"the worker stopped heartbeating on attempt {job.attempt} "
                        f"of {settings.max_attempts}; giving up",
                    },
                }
                kind = "failed"
            elif job.cancel_requested:
                new_values = {"status": "cancelled", "finished_at": utcnow(), "lease_expires_at": None}
                kind = "cancelled"
            else:
                new_values = {"status": "queued", "lease_expires_at": None, "stage": "requeued after worker loss"}
                kind = "queued"
            # conditional on the attempt we saw: a late heartbeat of that attempt wins the race
            result = session.execute(
                update(Job)
                .where(Job.id == job.id, Job.status == "running", Job.attempt == job.attempt)
                .values(**new_values)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                continue
            session.add(JobEvent(job_id=job.id, kind="state", data={"status": kind, "reason": "lease expired"}))
            if kind == "queued":
                enqueue(session, task=RUN_JOB, object_id=job.id, queue=job.queue, priority=job.priority)
            touched += 1
            log.warning("job %s lease expired on attempt %s: now %s", job.id, job.attempt, kind)
    return touched
