"""Faults a running service meets: a database that goes away for a while, a job that runs past its limit."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from app.db import session_scope
from app.tables import Artifact
from tests.conftest import unavailable
from tests.helpers import WorkerProcess, processes_mentioning, slow_torchscript_bytes, torchscript_bytes, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]


def _postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not found:
        unavailable("PostgreSQL server binaries (pg_ctl)", FileNotFoundError("/usr/lib/postgresql/*/bin/pg_ctl"))
    return found[-1].parent


class PrivatePostgres:
    """A PostgreSQL server of the test's own, so it can be stopped and started without harming others."""

    def __init__(self, folder: Path) -> None:
        self.bin = _postgres_bin()
        self.folder = folder
        self.data = folder / "pgdata"
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *command: str) -> None:
        # the server refuses to run as root; run it as the system's postgres user when we are root
        prefix = ["runuser", "-u", "postgres", "--"] if shutil.which("runuser") and _is_root() else []
        done = subprocess.run(prefix + list(command), capture_output=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{command[0]} failed: {done.stderr.decode(errors='replace')[-1000:]}")

    def init(self) -> PrivatePostgres:
        self.folder.mkdir(parents=True, exist_ok=True)
        if _is_root():
            shutil.chown(self.folder, "postgres")
            self.folder.chmod(0o755)
        self._as_postgres(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres")
        return self

    def start(self) -> None:
        self._as_postgres(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-w",
            "-l",
            str(self.folder / "log"),
            "-o",
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1",
            "start",
        )

    def stop(self) -> None:
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")


def _is_root() -> bool:
    import os

    return os.geteuid() == 0


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    import tempfile

    # not under pytest's tmp folder: that is private to root, and the server runs as the postgres user
    folder = Path(tempfile.mkdtemp(prefix="modelpress-pg-"))
    server = PrivatePostgres(folder).init()
    server.start()
    try:
        yield server
    finally:
        try:
            server.stop()
        except RuntimeError:
            pass
        shutil.rmtree(folder, ignore_errors=True)


def test_a_database_outage_costs_the_running_attempt_nothing(
    private_postgres: PrivatePostgres, redis_url: str, service_env, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """PostgreSQL stopped for 20 s mid-job: the API answers 503 meanwhile; the job finishes on attempt 1."""
    from fastapi.testclient import TestClient

    from app.auth import create_key
    from app.main import create_app
    from app.migrate import upgrade

    upgrade(private_postgres.url)
    env = service_env(database_url=private_postgres.url, broker_url=redis_url)
    with session_scope() as session:
        _, key = create_key(session, tenant_name="outage")
    headers = {"Authorization": f"Bearer {key}"}
    worker = WorkerProcess(env, log_path=tmp_path / "worker.log").start()
    try:
        with TestClient(create_app()) as client:
            model = client.post("/v1/models", headers=headers, files={"file": ("slow.pt", slow_torchscript_bytes())})
            job_id = client.post(
                "/v1/jobs",
                headers=headers,
                json={
                    "model_id": model.json()["id"],
                    "stages": [{"method": "quantize", "scheme": "dynamic_int8"}],
                    "example_input_shape": [1, 8],
                },
            ).json()["id"]
            wait_for(
                lambda: client.get(f"/v1/jobs/{job_id}", headers=headers).json()["status"] == "running",
                180,
                "job running",
            )
            private_postgres.stop()
            stopped_at = time.monotonic()
            during = client.get(f"/v1/jobs/{job_id}", headers=headers)
            assert during.status_code == 503, during.text
            assert during.headers.get("Retry-After")
            time.sleep(max(0.0, 20 - (time.monotonic() - stopped_at)))
            private_postgres.start()

            def finished() -> dict | None:
                response = client.get(f"/v1/jobs/{job_id}", headers=headers)
                if response.status_code != 200:
                    return None  # the first request after the restart may meet a dead pooled connection
                body = response.json()
                return body if body["status"] in ("succeeded", "failed", "cancelled") else None

            job = wait_for(finished, 300, "job finished after the database came back")
            assert job["status"] == "succeeded", (job["error"], worker.log_tail())
            assert job["attempt"] == 1
        with session_scope() as session:
            assert len(session.scalars(select(Artifact).where(Artifact.job_id == job_id)).all()) == 1
        assert "database unavailable" in worker.log_tail() or "retrying" in worker.log_tail()
    finally:
        worker.stop()


def test_a_job_past_its_time_limit_fails_and_leaves_no_process(
    make_postgres_database, redis_url: str, service_env, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """A looping model with a 10 s limit: the job fails with the reason, no process of it is left 2 s later,
    and the same worker slot then runs the next job."""
    import torch
    from fastapi.testclient import TestClient
    from torch import nn

    from app.auth import create_key
    from app.main import create_app
    from app.migrate import upgrade

    class Loop(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for _ in range(1000000000):
                x = x + 1
            return x

    database_url = make_postgres_database()
    upgrade(database_url)
    env = service_env(
        database_url=database_url, broker_url=redis_url, job_soft_time_limit_s="10", job_time_limit_s="60"
    )
    with session_scope() as session:
        _, key = create_key(session, tenant_name="time-limit")
    headers = {"Authorization": f"Bearer {key}"}
    worker = WorkerProcess(env, log_path=tmp_path / "worker.log").start()
    scratch_root = str(Path(env["MODELPRESS_DATA_DIR"]).resolve() / "scratch")
    try:
        with TestClient(create_app()) as client:
            looping = client.post("/v1/models", headers=headers, files={"file": ("loop.pt", torchscript_bytes(Loop()))})
            job_id = client.post(
                "/v1/jobs",
                headers=headers,
                json={
                    "model_id": looping.json()["id"],
                    "stages": [{"method": "quantize", "scheme": "dynamic_int8"}],
                    "example_input_shape": [1, 4],
                },
            ).json()["id"]
            job = wait_for(
                lambda: (
                    (j := client.get(f"/v1/jobs/{job_id}", headers=headers).json())["status"] in ("succeeded", "failed")
                    and j
                ),
                180,
                "the looping job to end",
            )
            assert job["status"] == "failed"
            assert job["error"]["error"] == "TimeLimitExceeded", job["error"]
            assert "10 s" in job["error"]["detail"]
            time.sleep(2)
            assert processes_mentioning(f"{scratch_root}/{job_id}") == []
            small = client.post(
                "/v1/models",
                headers=headers,
                files={"file": ("m.pt", torchscript_bytes(nn.Sequential(nn.Linear(8, 4))))},
            )
            next_id = client.post(
                "/v1/jobs",
                headers=headers,
                json={
                    "model_id": small.json()["id"],
                    "stages": [{"method": "quantize", "scheme": "dynamic_int8"}],
                    "example_input_shape": [1, 8],
                },
            ).json()["id"]
            after = wait_for(
                lambda: (
                    (j := client.get(f"/v1/jobs/{next_id}", headers=headers).json())["status"]
                    in ("succeeded", "failed")
                    and j
                ),
                180,
                "the next job on the same slot",
            )
            assert after["status"] == "succeeded", after["error"]
    finally:
        worker.stop()
