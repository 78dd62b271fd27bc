"""Upload -> job -> real Celery worker process -> download -> load with stock torch -> compare.

Production mode: Postgres + Redis. Embedded mode: SQLite + the file-system broker, as `make run`.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from tests.helpers import WorkerProcess, mlp, slow_torchscript_bytes, sqnr_db, torchscript_bytes, wait_for
from tests.zoo import readme_loader

pytestmark = pytest.mark.slow


class Service:
    def __init__(self, client: TestClient, key: str, worker: WorkerProcess) -> None:
        self.client, self.key, self.worker = client, key, worker
        self.headers = {"Authorization": f"Bearer {key}"}

    def upload(self, blob: bytes, name: str = "model.pt") -> dict:
        response = self.client.post("/v1/models", headers=self.headers, files={"file": (name, blob)})
        assert response.status_code == 201, response.text
        return response.json()

    def submit(self, spec: dict) -> dict:
        response = self.client.post("/v1/jobs", headers=self.headers, json=spec)
        assert response.status_code == 202, response.text
        return response.json()

    def wait(self, job_id: str, timeout: float = 240) -> dict:
        def finished() -> dict | None:
            job = self.client.get(f"/v1/jobs/{job_id}", headers=self.headers).json()
            return job if job["status"] in ("succeeded", "failed", "cancelled") else None

        try:
            return wait_for(finished, timeout, f"job {job_id} to finish")
        except AssertionError:
            raise AssertionError(f"job {job_id} did not finish; worker log:\n{self.worker.log_tail()}") from None


def start_service(env: dict[str, str], tmp_path: Path) -> Iterator[Service]:
    from app.auth import create_key
    from app.db import session_scope
    from app.main import create_app

    with session_scope() as session:
        _, key = create_key(session, tenant_name="e2e")
    worker = WorkerProcess(env, log_path=tmp_path / "worker.log").start()
    try:
        with TestClient(create_app()) as client:
            yield Service(client, key, worker)
    finally:
        worker.stop()


@pytest.fixture
def production(make_postgres_database, redis_url, service_env, tmp_path) -> Iterator[Service]:  # type: ignore[no-untyped-def]
    from app.migrate import upgrade

    database_url = make_postgres_database()
    upgrade(database_url)
    env = service_env(database_url=database_url, broker_url=redis_url)
    yield from start_service(env, tmp_path)


@pytest.fixture
def embedded(service_env, tmp_path) -> Iterator[Service]:  # type: ignore[no-untyped-def]
    from app.migrate import upgrade

    # the webhook check posts to a listener on loopback, which only an allowed host may reach
    env = service_env(webhook_allowed_hosts="127.0.0.1")
    upgrade()
    yield from start_service(env, tmp_path)


def check_dynamic_int8_round_trip(service: Service) -> dict:
    torch.manual_seed(0)
    model = mlp((256, 1024, 256)).eval()
    source = torchscript_bytes(model)
    uploaded = service.upload(source)
    job = service.wait(
        service.submit(
            {
                "model_id": uploaded["id"],
                "stages": [{"method": "quantize", "scheme": "dynamic_int8"}],
                "example_input_shape": [32, 256],
                "target": {"device": "cpu"},
                "output_format": "torchscript",
            }
        )["id"]
    )
    assert job["status"] == "succeeded", job["error"]
    download = service.client.get(f"/v1/jobs/{job['id']}/artifact", headers=service.headers)
    assert download.status_code == 200
    blob = download.content
    assert download.headers["ETag"] == f'"{job["artifact"]["sha256"]}"'
    # independent measurements of what the service reported
    metrics = job["metrics"]
    assert len(blob) == metrics["compressed"]["size_bytes"] == job["artifact"]["size_bytes"]
    assert metrics["original"]["size_bytes"] == len(source)
    assert metrics["compression_ratio"] == pytest.approx(len(source) / len(blob), rel=1e-3)
    assert metrics["original"]["parameters"] == sum(p.numel() for p in model.parameters())
    assert len(blob) < 0.35 * len(source)
    quantized = torch.jit.load(io.BytesIO(blob))
    x = torch.randn(64, 256)
    with torch.no_grad():
        measured = sqnr_db(model(x), quantized(x))
    assert measured >= 20
    assert abs(measured - metrics["fidelity"]["sqnr_db"]) < 6
    assert metrics["compressed"]["latency_ms_p95"] >= metrics["compressed"]["latency_ms_p50"] > 0
    assert metrics["batch_size"] == 32 and metrics["device"] == "cpu"
    assert job["spec"]["stages"][0]["scheme"] == "dynamic_int8"
    return job


def check_failure_is_readable_and_worker_lives_on(service: Service) -> None:
    uploaded = service.upload(torchscript_bytes(mlp((16, 8, 4))))
    failed = service.wait(
        service.submit(
            {
                "model_id": uploaded["id"],
                "stages": [{"method": "quantize", "scheme": "dynamic_int8"}],
                "example_input_shape": [2, 7],
            }
        )["id"]
    )
    assert failed["status"] == "failed"
    assert failed["error"]["error"] == "EngineError" and "shape [2, 7]" in failed["error"]["detail"]
    assert failed["artifact"] is None
    ok = service.wait(
        service.submit(
            {
                "model_id": uploaded["id"],
                "stages": [{"method": "quantize", "scheme": "dynamic_int8"}],
                "example_input_shape": [2, 16],
            }
        )["id"]
    )
    assert ok["status"] == "succeeded", ok["error"]


@pytest.mark.postgres
@pytest.mark.redis
def test_production_mode_postgres_redis_and_a_real_worker(production: Service) -> None:
    check_dynamic_int8_round_trip(production)
    check_pruned_accuracy_matches_an_independent_measurement(production)
    check_failure_is_readable_and_worker_lives_on(production)
    workers = production.client.get("/v1/workers", headers=production.headers).json()["items"]
    assert workers and "cpu" in workers[0]["capabilities"]["devices"]


def test_embedded_mode_sqlite_and_file_broker(embedded: Service) -> None:
    job = check_dynamic_int8_round_trip(embedded)
    check_corrupted_artifact_is_refused_and_retention_removes_it(embedded, job)
    check_webhook_is_called(embedded)
    check_cancelling_a_running_job(embedded)
    model = mlp((16, 8, 4))
    uploaded = embedded.upload(torchscript_bytes(model))
    inspected = wait_for(
        lambda: (
            (m := embedded.client.get(f"/v1/models/{uploaded['id']}", headers=embedded.headers).json())["status"]
            != "pending"
            and m
        ),
        120,
        "model inspection",
    )
    assert inspected["status"] == "ready"
    assert inspected["inspection"]["parameters"] == sum(p.numel() for p in model.parameters())
    assert inspected["inspection"]["layer_types"]["Linear"] == 2


def check_webhook_is_called(service: Service) -> None:
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    received: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return None

    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uploaded = service.upload(torchscript_bytes(mlp((16, 8, 4))))
        job = service.wait(
            service.submit(
                {
                    "model_id": uploaded["id"],
                    "stages": [{"method": "quantize", "scheme": "dynamic_int8"}],
                    "example_input_shape": [2, 16],
                    "webhook_url": f"http://127.0.0.1:{server.server_port}/hook",
                }
            )["id"]
        )
        wait_for(lambda: received, 30, "webhook call")
        assert received[0]["id"] == job["id"] and received[0]["status"] == "succeeded"
        assert received[0]["compression_ratio"] == job["metrics"]["compression_ratio"]
    finally:
        server.shutdown()


def check_cancelling_a_running_job(service: Service) -> None:
    uploaded = service.upload(slow_torchscript_bytes(), name="slow.pt")
    job_id = service.submit(
        {
            "model_id": uploaded["id"],
            "stages": [{"method": "quantize", "scheme": "dynamic_int8"}],
            "example_input_shape": [1, 8],
        }
    )["id"]
    wait_for(
        lambda: service.client.get(f"/v1/jobs/{job_id}", headers=service.headers).json()["status"] == "running",
        120,
        "job running",
    )
    response = service.client.post(f"/v1/jobs/{job_id}/cancel", headers=service.headers)
    assert response.status_code == 200
    job = service.wait(job_id, timeout=60)
    assert job["status"] == "cancelled" and job["artifact"] is None
    assert service.client.get(f"/v1/jobs/{job_id}/artifact", headers=service.headers).status_code == 409


def check_corrupted_artifact_is_refused_and_retention_removes_it(service: Service, job: dict) -> None:
    from sqlalchemy import select

    from app.config import get_settings
    from app.db import session_scope
    from app.retention import remove_expired_artifacts
    from app.tables import Artifact

    with session_scope() as session:
        key = session.scalar(select(Artifact.storage_key).where(Artifact.job_id == job["id"]))
    stored = get_settings().data_dir / "storage" / key
    blob = bytearray(stored.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    stored.write_bytes(bytes(blob))
    refused = service.client.get(f"/v1/jobs/{job['id']}/artifact", headers=service.headers)
    assert refused.status_code == 500 and refused.json()["error"] == "ArtifactCorrupted"
    assert job["artifact"]["sha256"] in refused.json()["detail"]

    assert remove_expired_artifacts(older_than_days=0) >= 1
    assert not stored.exists()
    after = service.client.get(f"/v1/jobs/{job['id']}", headers=service.headers).json()
    assert after["artifact"] is None and after["status"] == "succeeded"
    assert service.client.get(f"/v1/jobs/{job['id']}/artifact", headers=service.headers).status_code == 409


def check_pruned_accuracy_matches_an_independent_measurement(service: Service) -> None:
    from tests.helpers import accuracy, digits_split, npz_bytes, train

    x_train, x_test, y_train, y_test = digits_split()
    model = train(mlp((64, 128, 10)), x_train, y_train, epochs=15)
    uploaded = service.upload(torchscript_bytes(model))
    response = service.client.post(
        "/v1/datasets", headers=service.headers, files={"file": ("eval.npz", npz_bytes(x_test, y_test))}
    )
    assert response.status_code == 201
    job = service.wait(
        service.submit(
            {
                "model_id": uploaded["id"],
                "eval_dataset_id": response.json()["id"],
                "stages": [{"method": "prune", "scheme": "l1_unstructured", "amount": 0.7}],
            }
        )["id"]
    )
    assert job["status"] == "succeeded", job["error"]
    assert job["artifact"]["format"] == "sparse_state_dict"
    blob = service.client.get(f"/v1/jobs/{job['id']}/artifact", headers=service.headers).content
    state = torch.load(io.BytesIO(blob), weights_only=True)
    state = readme_loader()["decode_sparse_state_dict"](state)  # the README's loading code
    pruned = mlp((64, 128, 10))
    pruned.load_state_dict(state)
    metrics = job["metrics"]
    assert metrics["original"]["accuracy"] == pytest.approx(accuracy(model, x_test, y_test), abs=1e-6)
    assert metrics["compressed"]["accuracy"] == pytest.approx(accuracy(pruned.eval(), x_test, y_test), abs=1e-6)
    hidden = state["0.weight"]
    assert float((hidden == 0).float().mean()) == pytest.approx(0.7, abs=0.01)
    zeros = sum(int((v == 0).sum()) for k, v in state.items() if k.endswith("weight"))
    total = sum(v.numel() for k, v in state.items())
    assert metrics["compressed"]["nonzero_parameters"] == total - zeros - sum(
        int((v == 0).sum()) for k, v in state.items() if k.endswith("bias")
    )
    assert len(blob) == metrics["compressed"]["size_bytes"] < metrics["original"]["size_bytes"]


def test_serve_restarts_its_embedded_worker_when_it_dies(tmp_path: Path) -> None:
    """`make run`'s worker is supervised: killed with SIGKILL, a new one registers and takes jobs."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    import httpx

    from tests.helpers import PROJECT_ROOT

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, MODELPRESS_DATA_DIR=str(tmp_path / "data"))
    for name in ("MODELPRESS_DATABASE_URL", "MODELPRESS_BROKER_URL", "MODELPRESS_STORAGE_URL"):
        env.pop(name, None)
    cli = [sys.executable, "-m", "modelpress.cli"]
    subprocess.run([*cli, "migrate"], cwd=PROJECT_ROOT, env=env, check=True, capture_output=True)
    key = subprocess.run(
        [*cli, "keys", "create", "--tenant", "t"], cwd=PROJECT_ROOT, env=env, check=True, capture_output=True, text=True
    ).stdout.split()[-1]
    server = subprocess.Popen(
        [*cli, "serve", "--port", str(port), "--embedded-worker"],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}

    def worker_pids() -> list[int]:
        try:
            items = httpx.get(f"{base}/v1/workers", headers=headers, timeout=5).json()["items"]
        except httpx.HTTPError:
            return []
        return [int(item["name"].rsplit(":", 1)[1]) for item in items]

    try:
        [first] = wait_for(worker_pids, 120, "the embedded worker to register")
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: any(pid != first for pid in worker_pids()), 120, "a restarted worker")
        model = httpx.post(
            f"{base}/v1/models", headers=headers, timeout=30, files={"file": ("m.pt", torchscript_bytes(mlp((8, 4))))}
        ).json()
        job = httpx.post(
            f"{base}/v1/jobs",
            headers=headers,
            timeout=30,
            json={
                "model_id": model["id"],
                "stages": [{"method": "quantize", "scheme": "dynamic_int8"}],
                "example_input_shape": [1, 8],
            },
        ).json()
        done = wait_for(
            lambda: (
                (j := httpx.get(f"{base}/v1/jobs/{job['id']}", headers=headers).json())["status"]
                in ("succeeded", "failed")
                and j
            ),
            180,
            "a job on the restarted worker",
        )
        assert done["status"] == "succeeded", done["error"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def test_token_model_with_declared_inputs_through_the_service(embedded: Service, tmp_path: Path) -> None:
    """A TorchScript encoder taking (input_ids, attention_mask) and returning a tuple: declared inputs,
    a dataset of named arrays, dynamic int8 in the worker, and the downloaded artifact measured here."""
    import numpy as np

    from tests.engine.test_real_models import SEQ, TOKEN_INPUTS, VOCAB, TinyEncoder

    torch.manual_seed(0)
    model = TinyEncoder().eval()
    ids, mask = torch.randint(0, VOCAB, (2, SEQ)), torch.ones(2, SEQ, dtype=torch.long)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.trace(model, (ids, mask), check_trace=False), buffer)
    uploaded = embedded.upload(buffer.getvalue(), "encoder.pt")
    data = io.BytesIO()
    np.savez(data, input_ids=torch.randint(0, VOCAB, (32, SEQ)).numpy(), attention_mask=np.ones((32, SEQ), np.int64))
    response = embedded.client.post(
        "/v1/datasets", headers=embedded.headers, files={"file": ("tokens.npz", data.getvalue())}
    )
    assert response.status_code == 201, response.text
    job = embedded.wait(
        embedded.submit(
            {
                "model_id": uploaded["id"],
                "dataset_id": response.json()["id"],
                "inputs": TOKEN_INPUTS,
                "stages": [{"method": "quantize", "scheme": "dynamic_int8"}],
            }
        )["id"]
    )
    assert job["status"] == "succeeded", job["error"]
    blob = embedded.client.get(f"/v1/jobs/{job['id']}/artifact", headers=embedded.headers).content
    quantized = torch.jit.load(io.BytesIO(blob))
    test_ids = torch.randint(0, VOCAB, (8, SEQ))
    test_mask = torch.ones(8, SEQ, dtype=torch.long)
    test_mask[:, 12:] = 0
    with torch.no_grad():
        measured = sqnr_db(model(test_ids, test_mask)[0], quantized(test_ids, test_mask)[0])
    assert measured >= 30, measured
    assert len(job["metrics"]["fidelity"]["outputs"]) == 2
    assert job["metrics"]["fidelity"]["sqnr_db"] >= 30


def test_zoo_bert_loses_heads_through_the_service(embedded: Service, tmp_path: Path) -> None:
    """ln_structured with heads on a TorchScript BERT upload (converted to an exported program in the
    worker): the .pt2 artifact is smaller and runs at other batches."""
    from tests.zoo import VOCAB, build
    from tests.zoo import torchscript_bytes as zoo_torchscript_bytes

    entry = build("bert")
    uploaded = embedded.upload(zoo_torchscript_bytes(entry), "bert.pt")
    ids_spec = {"name": "input_ids", "shape": [2, 12], "dtype": "int64", "low": 0, "high": VOCAB, "dynamic": [0]}
    job = embedded.wait(
        embedded.submit(
            {
                "model_id": uploaded["id"],
                "inputs": [ids_spec, dict(ids_spec, name="attention_mask", low=1, high=2)],
                "stages": [{"method": "prune", "scheme": "ln_structured", "heads": 0.5, "amount": 0.5}],
            }
        )["id"]
    )
    assert job["status"] == "succeeded", job["error"]
    assert [row["heads_after"] for row in job["metrics"]["stages"][0]["info"]["attention"]] == [1, 1]
    blob = embedded.client.get(f"/v1/jobs/{job['id']}/artifact", headers=embedded.headers).content
    pruned = torch.export.load(io.BytesIO(blob)).module()

    def count(model: torch.nn.Module) -> int:
        return sum(t.numel() for t in {id(t): t for t in model.state_dict().values()}.values())

    assert count(pruned) < 0.7 * count(entry.model)
    ids = torch.randint(0, VOCAB, (5, 12))
    with torch.no_grad():
        hidden = pruned(ids, torch.ones_like(ids))  # the TorchScript model's dict of outputs, kept
    assert hidden["last_hidden_state"].shape == (5, 12, 32)
