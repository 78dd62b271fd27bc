"""Run untrusted model code in a child process with resource limits.

TorchScript and exported programs are code; they are only ever loaded in a
child with limits on address space, CPU time, file size and open files, a
wall-clock timeout, an environment without secrets and a scratch working
directory. The parent (the Celery task) survives whatever the child does.

The child speaks JSON lines on stdout: {"type": "progress", ...} and
{"type": "event", ...}; it writes its result (or its error) to a JSON file.
"""
from __future__ import annotations

import ctypes
import json
import os
import queue
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Limits:
    memory_bytes: int
    cpu_seconds: int
    file_bytes: int
    open_files: int
    wall_seconds: float
    threads: int = 1


@dataclass
class SandboxOutcome:
    ok: bool
    result: dict[str, Any] | None
    error: dict[str, str] | None
    stopped: bool = False  # stopped by the parent (cancelled or fenced)


def _apply_limits(limits: Limits) -> Callable[[], None]:
    def apply() -> None:
        os.setsid()
        # die with the worker process that started us, so a killed worker leaves no orphan running
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 5))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _clean_environment(scratch: Path, threads: int) -> dict[str, str]:
    # Nothing from the worker's environment: no database URLs, no cloud credentials.
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(scratch), "TMPDIR": str(scratch),
            "LANG": "C.UTF-8", "PYTHONPATH": str(PROJECT_ROOT), "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "TORCHINDUCTOR_CACHE_DIR": str(scratch / "inductor")}


def _describe_exit(code: int, limits: Limits) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        hints = {"SIGKILL": f"killed (out of memory: the limit is {limits.memory_bytes} bytes, or the time limit)",
                 "SIGXCPU": f"CPU time limit of {limits.cpu_seconds} s exceeded",
                 "SIGXFSZ": f"file size limit of {limits.file_bytes} bytes exceeded",
                 "SIGSEGV": "the model code crashed (segmentation fault)"}
        return hints.get(name, f"terminated by {name}")
    return f"exited with status {code}"


def run_sandboxed(mode: str, request: dict[str, Any], scratch: Path, limits: Limits, *,
                  on_message: Callable[[dict[str, Any]], None] = lambda m: None,
                  should_stop: Callable[[], bool] = lambda: False, poll_s: float = 1.0) -> SandboxOutcome:
    """Run `worker.sandbox` in a limited child; `should_stop` is polled and kills the child when true."""
    scratch.mkdir(parents=True, exist_ok=True)
    request_path, result_path = scratch / "request.json", scratch / "result.json"
    request_path.write_text(json.dumps(request))
    result_path.unlink(missing_ok=True)
    stderr_path = scratch / "stderr.log"
    with open(stderr_path, "wb") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-m", "worker.sandbox", mode, str(request_path), str(result_path)],
            cwd=scratch, env=_clean_environment(scratch, limits.threads), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=stderr, preexec_fn=_apply_limits(limits))
    lines: queue.Queue[bytes | None] = queue.Queue()

    def pump() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + limits.wall_seconds
    stopped = timed_out = False
    next_poll = 0.0
    while True:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            line = b""
        if line is None:
            break
        if line:
            try:
                on_message(json.loads(line))
            except json.JSONDecodeError:
                pass  # stray prints of user code
        now = time.monotonic()
        if now >= next_poll:
            next_poll = now + poll_s
            if should_stop():
                stopped = True
                break
            if now > deadline:
                timed_out = True
                break
    if stopped or timed_out:
        _kill_group(child)
    code = child.wait()
    if stopped:
        return SandboxOutcome(False, None, None, stopped=True)
    if timed_out:
        return SandboxOutcome(False, None, {"error": "TimeLimitExceeded",
                                            "detail": f"the job ran past its {limits.wall_seconds:.0f} s limit"})
    payload: dict[str, Any] | None = None
    if result_path.exists():
        try:
            payload = json.loads(result_path.read_text())
        except json.JSONDecodeError:
            payload = None
    if code == 0 and payload is not None and "result" in payload:
        return SandboxOutcome(True, payload["result"], None)
    if payload is not None and "error" in payload:
        return SandboxOutcome(False, None, payload["error"])
    tail = stderr_path.read_text(errors="replace")[-600:].strip()
    detail = f"the sandboxed process {_describe_exit(code, limits)}"
    if tail:
        detail += f"; last output: {tail.splitlines()[-1][:300]}"
    return SandboxOutcome(False, None, {"error": "SandboxFailure", "detail": detail})


def _kill_group(child: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------- child side

def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message, default=str) + "\n")
    sys.stdout.flush()


def _child_main(mode: str, request_path: str, result_path: str) -> int:
    request = json.loads(Path(request_path).read_text())
    try:
        if mode == "job":
            from worker.compression.pipeline import JobRequest, Reporter, run_job

            reporter = Reporter(
                progress=lambda fraction, stage: _emit({"type": "progress", "fraction": fraction, "stage": stage}),
                event=lambda kind, data: _emit({"type": "event", "kind": kind, "data": data}))
            result = run_job(JobRequest.from_dict(request), reporter)
        elif mode == "inspect":
            from worker.compression.inspect import inspect_model

            result = inspect_model(Path(request["path"]), request["format"], request.get("architecture"))
        else:
            raise ValueError(f"unknown sandbox mode {mode!r}")
    except Exception as error:
        from worker.compression.base import EngineError
        from worker.compression.errors import failure

        name = "EngineError" if isinstance(error, EngineError) else type(error).__name__
        detail = str(error) or name
        Path(result_path).write_text(json.dumps({"error": failure(name, detail)}))
        return 1
    Path(result_path).write_text(json.dumps({"result": result}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1], sys.argv[2], sys.argv[3]))
