"""The sandbox is an isolation boundary: hostile archives never run, and code that does run inside sees no
secrets, no other tenant's files, no network, and dies with its job."""

from __future__ import annotations

import io
import json
import os
import pickle
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.helpers import processes_mentioning
from worker.sandbox import Limits, _clean_environment, bubblewrap_command, run_sandboxed

LIMITS = Limits(memory_bytes=4 * 1024**3, cpu_seconds=120, file_bytes=1024**3, open_files=128, wall_seconds=120)


class TouchPayload:
    """Runs `touch marker` when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def _clean_pt2(path: Path) -> Path:
    program = torch.export.export(nn.Sequential(nn.Linear(8, 4)).eval(), (torch.randn(2, 8),))
    torch.export.save(program, str(path))
    return path


def _crafted_pt2s(folder: Path, marker: Path) -> dict[str, Path]:
    """Real exported programs whose pickled members carry a payload, in every place torch.export.load unpickles."""
    clean = _clean_pt2(folder / "clean.pt2")
    saved = io.BytesIO()
    torch.save(TouchPayload(marker), saved)
    crafted: dict[str, Path] = {}

    def rewrite(name: str, swap: str | None, extra: tuple[str, bytes] | None = None) -> None:
        target = folder / f"{name}.pt2"
        with zipfile.ZipFile(clean) as source, zipfile.ZipFile(target, "w") as out:
            for item in source.infolist():
                data = source.read(item.filename)
                if swap is not None and swap in item.filename:
                    data = saved.getvalue()
                out.writestr(item, data)
            if extra is not None:
                out.writestr(*extra)
        crafted[name] = target

    rewrite("pickled-sample-inputs", "sample_inputs")
    rewrite("pickled-weight", "weights/weight_0")
    rewrite("raw-pickled-constant", None, ("clean/data/constants/constant_0.pkl", pickle.dumps(TouchPayload(marker))))
    return crafted


def test_crafted_pt2_archives_are_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "ran"  # inside the writable scratch folder: the payload could create it if it ran
    for label, path in _crafted_pt2s(tmp_path, marker).items():
        outcome = run_sandboxed("inspect", {"path": str(path), "format": "exported_program"}, tmp_path, LIMITS)
        assert not outcome.ok, label
        assert outcome.error is not None
        assert "allowlist" in outcome.error["detail"] or "weights" in outcome.error["detail"], (label, outcome.error)
        assert not marker.exists(), f"{label} ran code"
    clean = run_sandboxed(
        "inspect", {"path": str(tmp_path / "clean.pt2"), "format": "exported_program"}, tmp_path, LIMITS
    )
    assert clean.ok and clean.result is not None and clean.result["parameters"] == 8 * 4 + 4


def test_the_forced_weights_only_load_stops_a_payload_the_scan_would_miss(tmp_path: Path) -> None:
    """Defence in depth: even without the archive scan, torch.export.load inside the guard refuses pickles."""
    from worker.compression.archive_check import _weights_only_loading

    marker = tmp_path / "ran"
    path = _crafted_pt2s(tmp_path, marker)["pickled-sample-inputs"]
    with pytest.raises(pickle.UnpicklingError), _weights_only_loading(), open(path, "rb") as handle:
        torch.export.load(handle)
    assert not marker.exists()


PROBE = r"""
import json, os, socket, sys
report = {"uid": os.getuid(), "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit())}
found = []
for pid in report["pids"]:
    try:
        found.append(open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace"))
    except OSError:
        pass
report["environ_has_secret"] = any("s3cret" in text for text in found) or "s3cret" in json.dumps(dict(os.environ))
def can_list(path):
    try:
        os.listdir(path)
        return True
    except OSError:
        return False
report["other_tenant_visible"] = can_list(sys.argv[1]) or os.path.exists(sys.argv[2])
report["project_data_visible"] = can_list(sys.argv[3])
try:
    with socket.create_connection(("127.0.0.1", int(sys.argv[4])), timeout=3):
        report["loopback"] = "connected"
except OSError as error:
    report["loopback"] = type(error).__name__
def can_write(path):
    try:
        open(path, "w").write("x")
        return True
    except OSError:
        return False
report["wrote_engine_code"] = can_write(sys.argv[5])
can_write(sys.argv[6])  # lands, if anywhere, in the sandbox's private tmpfs
open("probe.json", "w").write(json.dumps(report))
"""


def test_code_inside_the_boundary_sees_no_secrets_files_network_or_parent(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """What a payload that did run would get: run an attacker's script inside the same boundary."""
    monkeypatch.setenv("MODELPRESS_DATABASE_URL", "postgresql://admin:s3cret@db/modelpress")
    data = tmp_path / "data"
    other_tenant = data / "storage" / "models" / "other-tenant"
    other_tenant.mkdir(parents=True)
    (other_tenant / "model.pt").write_bytes(b"weights")
    scratch = data / "scratch" / "job-1"
    scratch.mkdir(parents=True)
    outside = data / "planted.txt"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    command = bubblewrap_command(scratch, _clean_environment(scratch, 1)) + [
        sys.executable,
        "-c",
        PROBE,
        str(other_tenant),
        str(other_tenant / "model.pt"),
        str(Path(__file__).resolve().parents[2] / "tests"),
        str(port),
        str(Path(__file__).resolve().parents[2] / "worker" / "planted.py"),
        str(outside),
    ]
    try:
        done = subprocess.run(command, cwd=scratch, env=_clean_environment(scratch, 1), capture_output=True, timeout=60)
    finally:
        listener.close()
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    report = json.loads((scratch / "probe.json").read_text())
    assert report["uid"] == 65534
    assert report["environ_has_secret"] is False
    assert os.getpid() not in report["pids"] and max(report["pids"]) < 100  # its own PID namespace
    assert report["other_tenant_visible"] is False
    assert report["project_data_visible"] is False
    assert report["loopback"] != "connected"
    assert report["wrote_engine_code"] is False
    assert not outside.exists()  # the real data folder never saw the write


def _looping_model(path: Path) -> None:
    class Loop(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for _ in range(1000000000):
                x = x + 1
            return x

    torch.jit.save(torch.jit.script(Loop()), str(path))


def test_an_interrupted_supervisor_leaves_no_sandbox_process(tmp_path: Path) -> None:
    """Celery's soft time limit raises inside the supervising loop: the child must die with it."""
    scratch = tmp_path / "job-loop"
    scratch.mkdir()
    _looping_model(scratch / "loop.pt")
    request = {
        "model": {"path": str(scratch / "loop.pt"), "format": "torchscript"},
        "stages": [{"method": "quantize", "scheme": "dynamic_int8", "options": {}}],
        "artifact_path": str(scratch / "out.pt"),
        "example_input_shape": [1, 4],
    }
    started = time.monotonic()

    class SoftTimeLimit(Exception):
        pass

    def interrupt() -> bool:
        if time.monotonic() - started > 6:
            raise SoftTimeLimit()
        return False

    with pytest.raises(SoftTimeLimit):
        run_sandboxed("job", request, scratch, LIMITS, should_stop=interrupt, poll_s=0.5)
    time.sleep(2)
    assert processes_mentioning(str(scratch)) == []


def test_the_sweeper_removes_dead_attempts_and_keeps_live_ones(tmp_path: Path) -> None:
    from worker.slots import scratch_folder, sweep_scratch

    dead = tmp_path / "job-a-1"
    dead.mkdir()
    (dead / "artifact.bin").write_bytes(b"x")
    stray = tmp_path / "partial.bin"
    stray.write_bytes(b"x")
    with scratch_folder(tmp_path / "job-b-1") as live:
        (live / "artifact.bin").write_bytes(b"x")
        removed = sweep_scratch(tmp_path, max_age_s=0)
        assert live.exists()
    assert sorted(removed) == ["job-a-1", "partial.bin"]
    assert not dead.exists() and not stray.exists()
    assert not (tmp_path / "job-b-1").exists()  # the context removed it when the job ended


def test_a_worker_without_bubblewrap_refuses_to_start(tmp_path: Path) -> None:
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path), "MODELPRESS_DATA_DIR": str(tmp_path / "data")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.celery_app",
            "worker",
            "-Q",
            "cpu",
            "--concurrency",
            "1",
            "--without-mingle",
            "--without-gossip",
        ],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        timeout=120,
    )
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode != 0, output[-2000:]
    assert "apt-get install bubblewrap" in output
    assert "MODELPRESS_SANDBOX_ISOLATION=none" in output


def _tiny_job(folder: Path) -> dict:
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Linear(8, 4))), str(folder / "m.pt"))
    return {
        "model": {"path": str(folder / "m.pt"), "format": "torchscript"},
        "stages": [{"method": "quantize", "scheme": "dynamic_int8", "options": {}}],
        "artifact_path": str(folder / "artifact.bin"),
        "example_input_shape": [1, 8],
    }


def test_a_warm_sandbox_serves_one_job_and_the_next_job_gets_a_fresh_one(tmp_path: Path) -> None:
    from worker.sandbox import WarmSandbox

    first = WarmSandbox(tmp_path / "warm-1", LIMITS, "bubblewrap")
    first_outcome = run_sandboxed("job", _tiny_job(first.folder), first.folder, LIMITS, warm=first)
    assert first_outcome.ok, first_outcome.error
    assert first.child.poll() is not None  # it exited after its one job
    (first.folder / "left-by-job-1").write_text("job 1 was here")
    first.discard()
    assert not first.folder.exists()
    second = WarmSandbox(tmp_path / "warm-2", LIMITS, "bubblewrap")
    try:
        assert second.child.pid != first.child.pid
        second_outcome = run_sandboxed("job", _tiny_job(second.folder), second.folder, LIMITS, warm=second)
        assert second_outcome.ok, second_outcome.error
        assert not (second.folder / "left-by-job-1").exists()
        assert first_outcome.result is not None and second_outcome.result is not None
        assert (
            second_outcome.result["metrics"]["compressed"]["size_bytes"]
            == first_outcome.result["metrics"]["compressed"]["size_bytes"]
        )
    finally:
        second.discard()


def test_a_cancelled_job_in_a_warm_sandbox_and_an_unused_warm_sandbox_leave_no_process(tmp_path: Path) -> None:
    from worker.sandbox import WarmSandbox

    warm = WarmSandbox(tmp_path / "warm-cancel", LIMITS, "bubblewrap")
    scratch = tmp_path / "job-loop"
    scratch.mkdir()
    _looping_model(warm.folder / "loop.pt")
    request = {
        "model": {"path": str(warm.folder / "loop.pt"), "format": "torchscript"},
        "stages": [{"method": "quantize", "scheme": "dynamic_int8", "options": {}}],
        "artifact_path": str(warm.folder / "out.pt"),
        "example_input_shape": [1, 4],
    }
    started = time.monotonic()
    outcome = run_sandboxed(
        "job", request, warm.folder, LIMITS, warm=warm, should_stop=lambda: time.monotonic() - started > 5, poll_s=0.5
    )
    assert outcome.stopped
    warm.discard()
    unused = WarmSandbox(tmp_path / "warm-unused", LIMITS, "bubblewrap")
    unused.discard()
    time.sleep(2)
    assert processes_mentioning(str(tmp_path)) == []


def test_raw_weights_that_look_like_a_pickle_or_a_zip_are_not_refused(tmp_path: Path) -> None:
    """Weights are stored as raw bytes; a first byte of 0x80 (or PK) is data, not a pickle."""
    from worker.compression.archive_check import check_exported_program_archive

    linear = nn.Linear(4, 2)
    with torch.no_grad():
        linear.weight.view(-1)[0] = torch.frombuffer(bytearray(b"\x80\x00\x00\x00"), dtype=torch.float32)[0]
    program = torch.export.export(nn.Sequential(linear).eval(), (torch.randn(2, 4),))
    path = tmp_path / "weights.pt2"
    torch.export.save(program, str(path))
    with zipfile.ZipFile(path) as archive:
        assert any(archive.read(n)[:1] == b"\x80" for n in archive.namelist() if "/weights/" in n)
    check_exported_program_archive(path)
    outcome = run_sandboxed("inspect", {"path": str(path), "format": "exported_program"}, tmp_path, LIMITS)
    assert outcome.ok, outcome.error


def test_every_warm_up_step_runs_and_covers_each_method_module_of_the_engine() -> None:
    """The warm child swallows a failing warm-up step (the job then pays for it), so a step broken by a torch
    upgrade would go unnoticed but for this test; and a method module added to the handler table is imported
    ahead of its job too."""
    from worker.compression.handlers import HANDLERS
    from worker.sandbox_warmup import PREWARM_MODULES, prewarm_steps

    for step in prewarm_steps():
        step()
    # each handler is named run_<module> after the method module it imports when its stage runs
    methods = {f"worker.compression.{handler.__name__.removeprefix('run_')}" for handler in HANDLERS.values()}
    assert methods <= set(PREWARM_MODULES)
    assert all(name in sys.modules for name in PREWARM_MODULES)


def test_a_warm_sandbox_leaves_nothing_of_its_warm_up_in_the_folder_its_job_gets(tmp_path: Path) -> None:
    from worker.sandbox import WarmSandbox

    warm = WarmSandbox(tmp_path / "warm-clean", LIMITS, "bubblewrap")
    try:
        assert warm.child.stdout is not None
        assert json.loads(warm.child.stdout.readline()) == {"type": "warm"}  # every warm-up step is done
        # no file but the lock and the log (importing torch._dynamo makes the empty inductor cache folder)
        files = sorted(str(path.relative_to(warm.folder)) for path in warm.folder.rglob("*") if not path.is_dir())
        assert files == [".in-use", "stderr.log"]
    finally:
        warm.discard()
