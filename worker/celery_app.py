"""The worker's Celery entry point (`celery -A worker.celery_app worker`): the app the API publishes to.

Task names and configuration live in `app.queue`, so the API never imports the worker package.
"""

from __future__ import annotations

from app.queue import INSPECT_MODEL, RUN_JOB, celery_app, get_celery, make_celery

__all__ = ["INSPECT_MODEL", "RUN_JOB", "celery_app", "get_celery", "make_celery"]
