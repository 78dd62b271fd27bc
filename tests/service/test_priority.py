"""Per-job priority is honoured by the queue (real Redis, real worker)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.helpers import WorkerProcess, mlp, torchscript_bytes, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]


def test_urgent_jobs_run_before_earlier_background_jobs(
    make_postgres_database,
    redis_url,
    service_env,  # type: ignore[no-untyped-def]
    tmp_path,
) -> None:
    from app.auth import create_key
    from app.db import session_scope
    from app.main import create_app
    from app.migrate import upgrade

    database_url = make_postgres_database()
    upgrade(database_url)
    env = service_env(database_url=database_url, broker_url=redis_url)
    with session_scope() as session:
        _, key = create_key(session, tenant_name="priority")
    headers = {"Authorization": f"Bearer {key}"}
    worker: WorkerProcess | None = None
    with TestClient(create_app()) as client:
        model = client.post(
            "/v1/models", headers=headers, files={"file": ("m.pt", torchscript_bytes(mlp((8, 16, 4))))}
        ).json()
        spec = {
            "model_id": model["id"],
            "stages": [{"method": "quantize", "scheme": "dynamic_int8"}],
            "example_input_shape": [1, 8],
        }
        background = [
            client.post("/v1/jobs", headers=headers, json={**spec, "priority": 0}).json()["id"] for _ in range(3)
        ]
        urgent = client.post("/v1/jobs", headers=headers, json={**spec, "priority": 9}).json()["id"]
        try:
            # the worker starts only now, with all four jobs waiting on the queue
            worker = WorkerProcess(env, log_path=tmp_path / "worker.log").start()
            ids = background + [urgent]
            wait_for(
                lambda: all(client.get(f"/v1/jobs/{i}", headers=headers).json()["status"] == "succeeded" for i in ids),
                240,
                "all jobs to finish",
            )
            started = {i: client.get(f"/v1/jobs/{i}", headers=headers).json()["started_at"] for i in ids}
        finally:
            if worker is not None:
                worker.stop()
    # the model's inspection task may run first; among the jobs, the urgent one starts first
    assert min(started, key=lambda i: started[i]) == urgent, started
