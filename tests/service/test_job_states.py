"""The job state machine: the transition table, and its writes on a real (SQLite) database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from app import job_states
from app.db import Base
from app.job_states import TERMINAL, TRANSITIONS, IllegalTransition, JobStatus, check_transition
from app.tables import Job, JobEvent, StoredModel, Tenant


def test_every_status_has_a_row_and_the_wire_values_are_unchanged() -> None:
    assert set(TRANSITIONS) == set(JobStatus)
    assert [s.value for s in JobStatus] == ["queued", "running", "succeeded", "failed", "cancelled"]


@pytest.mark.parametrize("status", sorted(TERMINAL))
def test_a_terminal_status_is_terminal(status: JobStatus) -> None:
    assert TRANSITIONS[status] == frozenset()
    for new in JobStatus:
        with pytest.raises(IllegalTransition):
            check_transition(status, new)


def test_terminal_is_exactly_the_states_without_a_way_out() -> None:
    assert {status for status, moves in TRANSITIONS.items() if not moves} == TERMINAL


def test_cancel_from_queued_and_running_only() -> None:
    assert {s for s in JobStatus if JobStatus.CANCELLED in TRANSITIONS[s]} == {JobStatus.QUEUED, JobStatus.RUNNING}


def test_retry_is_a_requeue_of_a_running_job_only() -> None:
    # today's retry: the reconciler requeues a running job whose worker was lost; a failed job stays failed
    assert {s for s in JobStatus if JobStatus.QUEUED in TRANSITIONS[s]} == {JobStatus.RUNNING}
    with pytest.raises(IllegalTransition):
        check_transition(JobStatus.FAILED, JobStatus.QUEUED)
    with pytest.raises(IllegalTransition):
        check_transition(JobStatus.QUEUED, JobStatus.SUCCEEDED)  # nothing finishes without being claimed


@pytest.fixture
def session() -> Iterator[Session]:
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as db:
        tenant = Tenant(name="t")
        db.add(tenant)
        db.flush()
        db.add(
            StoredModel(
                id="mdl_1", tenant_id=tenant.id, name="m", format="pt", size_bytes=1, sha256="0", storage_key="k"
            )
        )
        db.flush()
        yield db
    engine.dispose()


def _job(session: Session, **values: object) -> Job:
    tenant_id = session.scalars(select(Tenant.id)).one()
    job = Job(tenant_id=tenant_id, model_id="mdl_1", method="prune", spec={}, **values)
    session.add(job)
    session.flush()
    job_states.record_created(session, job)
    session.flush()
    session.expire(job)  # as a job read from the database by the API, the runner or the reconciler
    return job


def _states(session: Session, job: Job) -> list[str]:
    events = session.scalars(select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id))
    return [event.data["status"] for event in events]


def test_claim_then_finish_writes_each_state_once_with_its_event(session: Session) -> None:
    job = _job(session)
    attempt = job_states.claim(session, job, worker_name="w", lease_seconds=30)
    assert attempt == 1
    assert job_states.claim(session, job, worker_name="w2", lease_seconds=30) is None  # already running
    assert job_states.succeed(session, job.id, attempt)
    session.expire_all()
    stored = session.get(Job, job.id)
    assert stored is not None and stored.status is JobStatus.SUCCEEDED and stored.attempt == 1
    assert _states(session, job) == ["queued", "running", "succeeded"]


def test_a_stale_attempt_is_fenced_off(session: Session) -> None:
    job = _job(session)
    attempt = job_states.claim(session, job, worker_name="w", lease_seconds=30)
    assert attempt == 1
    assert not job_states.fail(session, job.id, attempt + 1, {"error": "E", "detail": "d"})
    session.expire_all()
    assert session.get(Job, job.id).status is JobStatus.RUNNING  # type: ignore[union-attr]


def test_an_illegal_move_raises_before_writing(session: Session) -> None:
    job = _job(session)
    with pytest.raises(IllegalTransition):
        job_states.transition(session, job.id, current=JobStatus.QUEUED, new=JobStatus.SUCCEEDED)
    assert _states(session, job) == ["queued"]


def test_cancel_ends_a_queued_job_and_flags_a_running_one(session: Session) -> None:
    queued, running = _job(session), _job(session)
    job_states.claim(session, running, worker_name="w", lease_seconds=30)
    job_states.cancel(session, queued)
    job_states.cancel(session, running)
    assert queued.status is JobStatus.CANCELLED and queued.finished_at is not None
    assert running.status is JobStatus.RUNNING and running.cancel_requested
    with pytest.raises(job_states.JobAlreadyFinished):
        job_states.cancel(session, queued)


@pytest.mark.parametrize(
    ("attempt", "cancel_requested", "expected"),
    [(1, False, JobStatus.QUEUED), (3, False, JobStatus.FAILED), (1, True, JobStatus.CANCELLED)],
)
def test_a_lost_attempt_is_requeued_until_the_cap(
    session: Session, attempt: int, cancel_requested: bool, expected: JobStatus
) -> None:
    job = _job(session, attempt=attempt - 1)
    assert job_states.claim(session, job, worker_name="w", lease_seconds=30) == attempt
    job.cancel_requested = cancel_requested
    assert job_states.end_lost_attempt(session, job, max_attempts=3) is expected
    assert job.status is expected
    assert _states(session, job)[-1] == expected.value
