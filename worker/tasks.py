"""Thin, named Celery tasks that take ids only; the runner does the work."""

from __future__ import annotations

from app.observability import job_id_var
from worker import registration, runner  # noqa: F401  (registration hooks worker signals)
from worker.celery_app import INSPECT_MODEL, RUN_JOB, celery_app


@celery_app.task(name=RUN_JOB)  # type: ignore[untyped-decorator]  # celery ships no type information
def run_job(job_id: str) -> str:
    token = job_id_var.set(job_id)  # every log line of this job carries its id
    try:
        return runner.run_job(job_id)
    finally:
        job_id_var.reset(token)


@celery_app.task(name=INSPECT_MODEL)  # type: ignore[untyped-decorator]  # celery ships no type information
def inspect_model(model_id: str) -> str:
    return runner.inspect_model(model_id)
