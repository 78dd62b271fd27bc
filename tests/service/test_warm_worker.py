"""Warm sandboxes through a real Celery worker: each job gets its own pre-started child and folder, never one a
job used before, and a cancelled job leaves no process behind."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import mlp, processes_mentioning, slow_torchscript_bytes, torchscript_bytes, wait_for
from tests.service.test_end_to_end import Service, start_service

pytestmark = pytest.mark.slow
RUNS_IN = re.compile(r"job (\S+) attempt \d+ runs in a (warm|cold) sandbox, folder (\S+), pid (\d+)")


@pytest.fixture
def embedded(service_env, tmp_path) -> Iterator[Service]:  # type: ignore[no-untyped-def]
    from app.migrate import upgrade

    env = service_env()
    upgrade()
    yield from start_service(env, tmp_path)


def _sandboxes(service: Service) -> dict[str, tuple[str, str, int]]:
    """job id -> (warm or cold, scratch folder name, host pid of its child), from the worker's log."""
    found = {}
    assert service.worker.log_path is not None
    for line in service.worker.log_path.read_text(errors="replace").splitlines():
        try:
            message = json.loads(line).get("message", "")
        except ValueError:
            continue
        match = RUNS_IN.search(message)
        if match:
            found[match.group(1)] = (match.group(2), match.group(3), int(match.group(4)))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def _scratch() -> Path:
    from app.config import get_settings

    return get_settings().scratch_dir


def test_two_jobs_run_in_two_different_warm_children_and_folders(embedded: Service) -> None:
    uploaded = embedded.upload(torchscript_bytes(mlp((16, 8, 4))))
    spec = {
        "model_id": uploaded["id"],
        "stages": [{"method": "quantize", "scheme": "dynamic_int8"}],
        "example_input_shape": [2, 16],
    }
    first = embedded.wait(embedded.submit(spec)["id"])
    assert first["status"] == "succeeded", first["error"]
    kind, first_folder, first_pid = _sandboxes(embedded)[first["id"]]
    assert kind == "warm"
    # job 1 is done: its child and its folder are gone before anything else runs
    wait_for(lambda: not _alive(first_pid), 30, "job 1's sandbox to exit")
    assert not (_scratch() / first_folder).exists()
    assert processes_mentioning(first_folder) == []

    second = embedded.wait(embedded.submit(spec)["id"])
    assert second["status"] == "succeeded", second["error"]
    kind, second_folder, second_pid = _sandboxes(embedded)[second["id"]]
    assert kind == "warm"
    assert second_pid != first_pid and second_folder != first_folder
    assert not (_scratch() / second_folder).exists()
    # both measured the same model the same way: the second child started from nothing job 1 left
    assert second["metrics"]["compressed"]["size_bytes"] == first["metrics"]["compressed"]["size_bytes"]


def test_a_job_cancelled_in_its_warm_sandbox_leaves_no_process_or_folder(embedded: Service) -> None:
    uploaded = embedded.upload(slow_torchscript_bytes(), name="slow.pt")
    job_id = embedded.submit(
        {
            "model_id": uploaded["id"],
            "stages": [{"method": "quantize", "scheme": "dynamic_int8"}],
            "example_input_shape": [1, 8],
        }
    )["id"]
    wait_for(
        lambda: (
            embedded.client.get(f"/v1/jobs/{job_id}", headers=embedded.headers).json()["status"] == "running"
            and job_id in _sandboxes(embedded)
        ),
        120,
        "job running in its sandbox",
    )
    kind, folder, pid = _sandboxes(embedded)[job_id]
    assert kind == "warm" and _alive(pid)
    assert embedded.client.post(f"/v1/jobs/{job_id}/cancel", headers=embedded.headers).status_code == 200
    job = embedded.wait(job_id, timeout=60)
    assert job["status"] == "cancelled"
    wait_for(lambda: not _alive(pid), 30, "the cancelled job's sandbox to exit")
    assert processes_mentioning(folder) == []  # bwrap and everything the model started under it
    assert not (_scratch() / folder).exists()
