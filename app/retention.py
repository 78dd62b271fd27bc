"""Artifact retention: remove the artifacts of jobs that finished long ago."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from app.db import session_scope
from app.storage import get_store
from app.tables import Artifact, Job, JobEvent, utcnow


def remove_expired_artifacts(older_than_days: int) -> int:
    """Delete stored artifacts (and their records) of jobs finished more than `older_than_days` ago."""
    cutoff = utcnow() - timedelta(days=older_than_days)
    removed = 0
    store = get_store()
    with session_scope() as session:
        rows = session.execute(
            select(Artifact, Job).join(Job, Job.id == Artifact.job_id).where(Job.finished_at < cutoff)
        ).all()
        for artifact, job in rows:
            store.delete(artifact.storage_key)
            session.delete(artifact)
            session.add(
                JobEvent(
                    job_id=job.id,
                    kind="log",
                    data={"message": f"artifact removed after {older_than_days} days of retention"},
                )
            )
            removed += 1
    return removed
