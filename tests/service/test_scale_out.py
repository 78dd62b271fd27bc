"""Scale-out: two real worker processes (queues cpu and gpu, separate scratch folders) that share only
Postgres, Redis and an S3 endpoint (moto's server mode on loopback); the API runs in the test process.

Also the submit-time check: a job no live worker can run answers 422 or is queued with a warning.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import get_settings
from tests.helpers import WorkerProcess, mlp, torchscript_bytes, wait_for
from tests.service.conftest import Api, make_bucket

STALE_AFTER_S = "15"  # workers beat every 10 s


def _upload(client: TestClient, headers: dict[str, str]) -> str:
    response = client.post("/v1/models", headers=headers, files={"file": ("m.pt", torchscript_bytes(mlp((32, 64, 8))))})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _job(model_id: str, device: str) -> dict:
    if device == "cpu":
        stages = [{"method": "quantize", "scheme": "dynamic_int8"}]
    else:  # a scheme valid on cuda, so only the device decides
        stages = [{"method": "prune", "scheme": "l1_unstructured", "amount": 0.5}]
    return {"model_id": model_id, "stages": stages, "example_input_shape": [4, 32], "target": {"device": device}}


# --- the submit-time check, with worker rows written directly (no processes) --------------------------------


def _register(name: str, devices: list[str], age_s: float = 0.0) -> None:
    from app.db import session_scope
    from app.tables import WorkerRecord, utcnow

    with session_scope() as session:
        session.merge(
            WorkerRecord(
                name=name,
                queues=["cpu"],
                capabilities={"devices": devices},
                last_heartbeat=utcnow() - timedelta(seconds=age_s),
            )
        )


@pytest.mark.postgres
def test_submit_refuses_or_warns_when_no_live_worker_can_run_the_job(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELPRESS_REQUIRE_LIVE_WORKER", "true")
    get_settings.cache_clear()
    model_id = _upload(api.client, api.headers())

    def submit(device: str) -> object:
        return api.client.post("/v1/jobs", headers=api.headers(), json=_job(model_id, device))

    # fresh install: no worker has ever registered, so nothing is refused (the first worker is on its way)
    fresh = submit("cuda")
    assert fresh.status_code == 202, fresh.text
    assert "warnings" not in fresh.json()["spec"]

    _register("host-a:1", ["cpu"])
    refused = submit("cuda")
    assert refused.status_code == 422, refused.text
    assert "no live worker" in refused.json()["detail"] and "cuda" in refused.json()["detail"]
    assert submit("cpu").status_code == 202

    monkeypatch.setenv("MODELPRESS_REQUIRE_LIVE_WORKER", "false")

    get_settings.cache_clear()
    queued = submit("cuda")
    assert queued.status_code == 202, queued.text
    assert queued.json()["status"] == "queued"
    assert any("no live worker" in w and "cuda" in w for w in queued.json()["spec"]["warnings"])

    monkeypatch.setenv("MODELPRESS_REQUIRE_LIVE_WORKER", "true")

    get_settings.cache_clear()
    _register("host-b:1", ["cpu", "cuda"])
    accepted = submit("cuda")
    assert accepted.status_code == 202, accepted.text
    assert "warnings" not in accepted.json()["spec"]

    # the cuda worker stops beating: it no longer counts
    _register("host-b:1", ["cpu", "cuda"], age_s=120)
    assert submit("cuda").status_code == 422
    # nobody beats any more: even cpu jobs are refused
    _register("host-a:1", ["cpu"], age_s=120)
    stale = submit("cpu")
    assert stale.status_code == 422 and "heartbeat" in stale.json()["detail"]
    assert api.client.get("/v1/workers", headers=api.headers()).json()["items"] == []


# --- two real workers ---------------------------------------------------------------------------------------


@dataclass
class Cluster:
    client: TestClient
    headers: dict[str, str]
    cpu: WorkerProcess
    gpu: WorkerProcess
    bucket: str
    endpoint: str

    def live(self) -> list[dict]:
        response = self.client.get("/v1/workers", headers=self.headers)
        assert response.status_code == 200, response.text
        return response.json()["items"]

    def wait(self, job_id: str, timeout: float = 150) -> dict:
        def finished() -> dict | None:
            job = self.client.get(f"/v1/jobs/{job_id}", headers=self.headers).json()
            return job if job["status"] in ("succeeded", "failed", "cancelled") else None

        try:
            return wait_for(finished, timeout, f"job {job_id} to finish")
        except AssertionError:
            raise AssertionError(
                f"job {job_id} did not finish\ncpu worker:\n{self.cpu.log_tail()}\ngpu worker:\n{self.gpu.log_tail()}"
            ) from None


@pytest.fixture
def cluster(
    make_postgres_database,
    redis_url,
    service_env,
    s3_env,
    tmp_path: Path,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Cluster]:
    from app.auth import create_key
    from app.db import session_scope
    from app.main import create_app
    from app.migrate import upgrade

    database_url = make_postgres_database()
    upgrade(database_url)
    bucket = make_bucket(s3_env["AWS_ENDPOINT_URL"])
    monkeypatch.setenv("MODELPRESS_WORKER_STALE_AFTER_S", STALE_AFTER_S)
    get_settings.cache_clear()
    monkeypatch.delenv("MODELPRESS_REQUIRE_LIVE_WORKER", raising=False)
    env = service_env(
        database_url=database_url,
        broker_url=redis_url,
        storage_url=f"s3://{bucket}/mp",
        data_dir=str(tmp_path / "api-data"),
    )
    with session_scope() as session:
        _, key = create_key(session, tenant_name="scale")
    # the same shared URLs, but each "host" has its own scratch folder (and the AWS_* variables via os.environ)
    cpu = WorkerProcess(
        dict(env, MODELPRESS_DATA_DIR=str(tmp_path / "host-cpu")), queues="cpu", log_path=tmp_path / "cpu.log"
    ).start()
    gpu = WorkerProcess(
        dict(env, MODELPRESS_DATA_DIR=str(tmp_path / "host-gpu")), queues="gpu", log_path=tmp_path / "gpu.log"
    ).start()
    try:
        with TestClient(create_app()) as client:
            yield Cluster(client, {"Authorization": f"Bearer {key}"}, cpu, gpu, bucket, s3_env["AWS_ENDPOINT_URL"])
    finally:
        cpu.stop()
        gpu.stop(signal.SIGKILL)


def _process_group(worker_name: str) -> int | None:
    try:
        return os.getpgid(int(worker_name.rsplit(":", 1)[1]))
    except (ProcessLookupError, ValueError, IndexError):
        return None


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_two_worker_pools_share_postgres_redis_and_s3(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import boto3

    c = cluster
    try:
        workers = wait_for(lambda: (items := c.live()) and len(items) == 2 and items, 90, "both workers registered")
    except AssertionError:
        raise AssertionError(f"cpu worker:\n{c.cpu.log_tail()}\ngpu worker:\n{c.gpu.log_tail()}") from None
    by_queue = {tuple(w["queues"]): w for w in workers}
    assert set(by_queue) == {("cpu",), ("gpu",)}
    assert _process_group(by_queue[("cpu",)]["name"]) == c.cpu.process.pid  # type: ignore[union-attr]
    assert _process_group(by_queue[("gpu",)]["name"]) == c.gpu.process.pid  # type: ignore[union-attr]
    for worker in workers:
        caps = worker["capabilities"]
        assert caps["devices"][0] == "cpu" and isinstance(caps["torch"], str) and "torchao" in caps
        assert "quantize:dynamic_int8" in caps["schemes"]

    model_id = _upload(c.client, c.headers)
    # strict mode: the cpu job is accepted, a cuda job (no live worker has CUDA) is refused
    monkeypatch.setenv("MODELPRESS_REQUIRE_LIVE_WORKER", "true")
    get_settings.cache_clear()
    cpu_job = c.client.post("/v1/jobs", headers=c.headers, json=_job(model_id, "cpu"))
    assert cpu_job.status_code == 202, cpu_job.text
    refused = c.client.post("/v1/jobs", headers=c.headers, json=_job(model_id, "cuda"))
    assert refused.status_code == 422 and "no live worker" in refused.json()["detail"], refused.text
    # lenient mode: queued with a warning; it goes to the gpu queue, whose worker says it has no CUDA
    monkeypatch.setenv("MODELPRESS_REQUIRE_LIVE_WORKER", "false")
    get_settings.cache_clear()
    gpu_job = c.client.post("/v1/jobs", headers=c.headers, json=_job(model_id, "cuda"))
    assert gpu_job.status_code == 202, gpu_job.text
    assert gpu_job.json()["spec"]["warnings"]

    done = c.wait(cpu_job.json()["id"])
    assert done["status"] == "succeeded", done["error"]
    failed = c.wait(gpu_job.json()["id"])
    assert failed["status"] == "failed"
    assert "no CUDA device" in failed["error"]["detail"], failed["error"]

    from app.db import session_scope
    from app.tables import Job

    with session_scope() as session:
        ran_on = {job_id: session.get(Job, job_id).worker_name for job_id in (done["id"], failed["id"])}  # type: ignore[union-attr]
    assert _process_group(ran_on[done["id"]]) == c.cpu.process.pid, ran_on  # type: ignore[union-attr]
    assert _process_group(ran_on[failed["id"]]) == c.gpu.process.pid, ran_on  # type: ignore[union-attr]

    # the artifact the cpu worker wrote to S3 downloads through the API, byte for byte
    download = c.client.get(f"/v1/jobs/{done['id']}/artifact", headers=c.headers)
    assert download.status_code == 200
    s3 = boto3.client("s3", endpoint_url=c.endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=c.bucket)["Contents"]]
    artifact_keys = [k for k in keys if k.startswith("mp/artifacts/") and done["id"] in k]
    assert len(artifact_keys) == 1 and any(k.startswith("mp/models/") for k in keys), keys
    assert s3.get_object(Bucket=c.bucket, Key=artifact_keys[0])["Body"].read() == download.content
    assert len(download.content) == done["artifact"]["size_bytes"]
    # nothing landed in the API's own folder: storage is S3, scratch is per worker host
    assert not (tmp_path / "api-data" / "storage").exists()

    # the gpu worker stops heartbeating (killed outright, no clean deregistration): it drops out
    c.gpu.stop(signal.SIGKILL)
    wait_for(
        lambda: [w["queues"] for w in c.live()] == [["cpu"]],
        float(STALE_AFTER_S) + 15,
        "the killed worker to drop out of /v1/workers",
    )
    methods = c.client.get("/v1/methods", headers=c.headers).json()
    assert methods["live_devices"] == ["cpu"]
