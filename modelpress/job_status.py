"""The five states of a job, as the v1 API writes them: the one place their strings are spelled.

Shared by the database table, the API schemas and the client, none of which needs more than this module
(no third-party imports). Which state may follow which is the service's rule: app/job_states.py.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# a job in one of these states never changes again
TERMINAL: frozenset[JobStatus] = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
# the states that count against a tenant's queued-job limit and keep a model from being deleted
ACTIVE: tuple[JobStatus, ...] = (JobStatus.QUEUED, JobStatus.RUNNING)
