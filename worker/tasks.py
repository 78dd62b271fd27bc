"""Thin, named Celery tasks that take ids only; the runner does the work."""
from __future__ import annotations

from worker import registration, runner  # noqa: F401  (registration hooks worker signals)
from worker.celery_app import INSPECT_MODEL, RUN_JOB, celery_app


@celery_app.task(name=RUN_JOB)
def run_job(job_id: str) -> str:
    return runner.run_job(job_id)


@celery_app.task(name=INSPECT_MODEL)
def inspect_model(model_id: str) -> str:
    return runner.inspect_model(model_id)
