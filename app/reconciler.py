"""Requeue jobs whose worker stopped heartbeating; fail them after the attempt cap."""

from __future__ import annotations

import logging
from datetime import timedelta

from app.config import get_settings
from app.db import session_scope
from app.job_states import JobStatus, end_lost_attempt
from app.outbox import enqueue
from app.queue import RUN_JOB
from app.repositories import jobs as jobs_repo
from app.tables import utcnow

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
        for job in jobs_repo.stale_queued(session, before=cutoff):
            if not jobs_repo.touch_if_unchanged(session, job, now=utcnow()):
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
        for job in jobs_repo.expired_leases(session, now=utcnow()):
            attempt = job.attempt
            # conditional on the attempt we saw: a late heartbeat of that attempt wins the race
            new = end_lost_attempt(session, job, max_attempts=settings.max_attempts)
            if new is None:
                continue
            if new == JobStatus.QUEUED:
                enqueue(session, task=RUN_JOB, object_id=job.id, queue=job.queue, priority=job.priority)
            touched += 1
            log.warning("job %s lease expired on attempt %s: now %s", job.id, attempt, new)
    return touched
