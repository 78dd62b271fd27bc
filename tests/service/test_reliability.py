"""No job lost, none run twice to harm: outbox, leases, fencing, reconciler, a killed worker."""

from __future__ import annotations

import signal
import time
from datetime import timedelta

import pytest
from sqlalchemy import select

from app.db import session_scope
from app.tables import Job, OutboxMessage, utcnow
from tests.conftest import unavailable
from tests.helpers import WorkerProcess, mlp, slow_torchscript_bytes, torchscript_bytes, wait_for
from tests.service.conftest import Api

pytestmark = pytest.mark.postgres


def submit_one(api: Api) -> str:
    model = api.client.post(
        "/v1/models", headers=api.headers(), files={"file": ("m.pt", torchscript_bytes(mlp((8, 16, 4))))}
    ).json()
    response = api.client.post(
        "/v1/jobs",
        headers=api.headers(),
        json={
            "model_id": model["id"],
            "stages": [{"method": "quantize", "scheme": "dynamic_int8"}],
            "example_input_shape": [1, 8],
        },
    )
    assert response.status_code == 202, response.text
    return response.json()["id"]


def outbox_for(job_id: str) -> list[OutboxMessage]:
    with session_scope() as session:
        return list(session.scalars(select(OutboxMessage).where(OutboxMessage.object_id == job_id)))


def test_broker_down_keeps_the_job_and_the_relay_publishes_it_later(api: Api, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from app.config import get_settings
    from app.outbox import relay_once
    from worker.celery_app import get_celery

    monkeypatch.setattr(get_settings(), "broker_url", "redis://127.0.0.1:1/0")
    get_celery.cache_clear()
    get_celery().conf.broker_connection_timeout = 1
    get_celery().conf.broker_transport_options = {"max_retries": 0}
    job_id = submit_one(api)
    [message] = outbox_for(job_id)
    assert message.published_at is None and message.publish_attempts >= 1
    monkeypatch.setattr(get_settings(), "broker_url", None)  # the embedded broker is "back"
    get_celery.cache_clear()
    assert relay_once() >= 1
    [message] = outbox_for(job_id)
    assert message.published_at is not None
    queued = list((get_settings().broker_folder / "queue").glob("*"))
    assert queued, "the relay did not put the task on the broker"


def test_rolled_back_submit_leaves_no_outbox_row(api: Api) -> None:
    response = api.client.post(
        "/v1/jobs",
        headers=api.headers(),
        json={
            "model_id": "mdl_missing",
            "stages": [{"method": "quantize", "scheme": "dynamic_int8"}],
            "example_input_shape": [1, 8],
        },
    )
    assert response.status_code == 404
    with session_scope() as session:
        assert session.scalars(select(OutboxMessage).where(OutboxMessage.task == "modelpress.run_job")).all() == []


def _expire(job_id: str, *, attempt: int) -> None:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.status, job.attempt = "running", attempt
        job.lease_expires_at = utcnow() - timedelta(seconds=5)


def test_reconciler_requeues_an_expired_lease_then_gives_up_at_the_cap(api: Api) -> None:
    from app.config import get_settings
    from app.reconciler import reconcile_once

    job_id = submit_one(api)
    _expire(job_id, attempt=1)
    assert reconcile_once() == 1
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status == "queued" and job.lease_expires_at is None
    assert len(outbox_for(job_id)) == 2  # the first publish and the requeue

    _expire(job_id, attempt=get_settings().max_attempts)
    assert reconcile_once() == 1
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status == "failed"
        assert job.error is not None and job.error["error"] == "WorkerLost"


def test_a_stale_attempt_is_fenced_out(api: Api) -> None:
    from worker.runner import claim_job, finish_failed

    job_id = submit_one(api)
    assert claim_job(job_id) == 1
    assert claim_job(job_id) is None  # only a queued job can be claimed
    with session_scope() as session:  # the reconciler took the job over: attempt 2 now runs
        job = session.get(Job, job_id)
        assert job is not None
        job.attempt = 2
    finish_failed(job_id, 1, {"error": "Stale", "detail": "late write of attempt 1"})
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status == "running" and job.error is None


@pytest.mark.slow
@pytest.mark.redis
def test_a_killed_worker_loses_no_job(make_postgres_database, redis_url, service_env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL the worker mid-job: the lease expires, the reconciler requeues, a new worker finishes it."""
    from fastapi.testclient import TestClient

    from app.auth import create_key
    from app.main import create_app
    from app.migrate import upgrade

    database_url = make_postgres_database()
    upgrade(database_url)
    env = service_env(database_url=database_url, broker_url=redis_url, lease_seconds="4")
    with session_scope() as session:
        _, key = create_key(session, tenant_name="reliability")
    headers = {"Authorization": f"Bearer {key}"}
    slow_model = slow_torchscript_bytes()  # slow enough to kill the worker while it runs
    first = WorkerProcess(env, log_path=tmp_path / "w1.log").start()
    second: WorkerProcess | None = None
    try:
        with TestClient(create_app()) as client:
            model = client.post("/v1/models", headers=headers, files={"file": ("slow.pt", slow_model)}).json()
            job_id = client.post(
                "/v1/jobs",
                headers=headers,
                json={
                    "model_id": model["id"],
                    "stages": [{"method": "quantize", "scheme": "dynamic_int8"}],
                    "example_input_shape": [1, 8],
                },
            ).json()["id"]
            wait_for(
                lambda: client.get(f"/v1/jobs/{job_id}", headers=headers).json()["status"] == "running",
                120,
                "job running",
            )
            first.stop(signal.SIGKILL)
            second = WorkerProcess(env, log_path=tmp_path / "w2.log").start()
            job = wait_for(
                lambda: (
                    (j := client.get(f"/v1/jobs/{job_id}", headers=headers).json())["status"] in ("succeeded", "failed")
                    and j
                ),
                240,
                "job finished after the worker was killed",
            )
            assert job["status"] == "succeeded", (job["error"], second.log_tail())
            assert job["attempt"] >= 2
            time.sleep(0.1)
    finally:
        first.stop(signal.SIGKILL)
        if second is not None:
            second.stop()


@pytest.mark.slow
def test_redis_restart_loses_no_accepted_job(make_postgres_database, service_env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A private Redis without persistence is restarted with jobs on it and while jobs are submitted:
    the outbox and the stale-queue republisher bring every accepted job to an end, exactly once."""
    import shutil
    import socket
    import subprocess

    from fastapi.testclient import TestClient

    from app.auth import create_key
    from app.main import create_app
    from app.migrate import upgrade
    from app.tables import Artifact

    redis_server = shutil.which("redis-server")
    if redis_server is None:
        unavailable("redis-server (the binary)", FileNotFoundError("redis-server"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    def start_redis() -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, 20, "private redis up")
        return process

    database_url = make_postgres_database()
    upgrade(database_url)
    env = service_env(
        database_url=database_url,
        broker_url=f"redis://127.0.0.1:{port}/0",
        requeue_queued_after_s="3",
        lease_seconds="6",
    )
    with session_scope() as session:
        _, key = create_key(session, tenant_name="redis-restart")
    headers = {"Authorization": f"Bearer {key}"}
    redis = start_redis()
    worker: WorkerProcess | None = None
    try:
        with TestClient(create_app()) as client:
            model = client.post(
                "/v1/models", headers=headers, files={"file": ("m.pt", torchscript_bytes(mlp((8, 16, 4))))}
            ).json()
            spec = {
                "model_id": model["id"],
                "stages": [{"method": "quantize", "scheme": "dynamic_int8"}],
                "example_input_shape": [1, 8],
            }
            before = [client.post("/v1/jobs", headers=headers, json=spec) for _ in range(2)]
            redis.kill()  # the two messages on it are lost with it
            redis.wait(10)
            during = client.post("/v1/jobs", headers=headers, json=spec)
            assert [r.status_code for r in before + [during]] == [202, 202, 202]
            redis = start_redis()
            worker = WorkerProcess(env, log_path=tmp_path / "worker.log").start()
            ids = [r.json()["id"] for r in before + [during]]

            def all_done() -> bool:
                statuses = [client.get(f"/v1/jobs/{i}", headers=headers).json()["status"] for i in ids]
                return all(s in ("succeeded", "failed") for s in statuses)

            wait_for(all_done, 240, "every accepted job to finish after the Redis restart")
            jobs = [client.get(f"/v1/jobs/{i}", headers=headers).json() for i in ids]
            assert [j["status"] for j in jobs] == ["succeeded"] * 3, [j["error"] for j in jobs]
            assert all(j["attempt"] == 1 for j in jobs)
        with session_scope() as session:
            for job_id in ids:
                assert len(session.scalars(select(Artifact).where(Artifact.job_id == job_id)).all()) == 1
    finally:
        if worker is not None:
            worker.stop()
        redis.kill()
