"""Database writes of the worker that ride out a short outage (retry with backoff)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError

from app.config import get_settings

log = logging.getLogger("modelpress.runner")
T = TypeVar("T")


def _is_connection_problem(error: Exception) -> bool:
    return isinstance(error, OperationalError) or (isinstance(error, DBAPIError) and error.connection_invalidated)


def with_database_retry(write: Callable[[], T], what: str, *, tolerance_s: float | None = None) -> T:
    """Run a database write, retrying with backoff through an outage shorter than the tolerance.

    A short database outage must not cost the running attempt: the engine keeps computing in its sandbox
    while we wait, and the write lands once the database is back.
    """
    limit = get_settings().database_outage_tolerance_s if tolerance_s is None else tolerance_s
    deadline = time.monotonic() + limit
    delay = 0.5
    while True:
        try:
            return write()
        except Exception as error:
            if not _is_connection_problem(error) or time.monotonic() + delay > deadline:
                raise
            log.warning(
                "database unavailable while writing %s; retrying in %.1f s: %s",
                what,
                delay,
                str(error).splitlines()[0][:200],
            )
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
