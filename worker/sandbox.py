"""Run untrusted model code in an isolated child process.

TorchScript, exported programs and anything torch.load touches are code. They are
only ever loaded in a child that runs under bubblewrap (`bwrap`): its own user,
PID, network, IPC and UTS namespaces, no network at all, a read-only view of the
Python environment and of the engine's package, no view of the worker's files,
of other jobs or tenants, or of the parent's /proc, an environment without
secrets, and one writable folder: the job's scratch folder. Resource limits
(address space, CPU time, file size, open files) and a wall-clock timeout apply
on top. The parent (the Celery task) survives whatever the child does, and the
child dies with it.

The child speaks JSON lines on stdout: {"type": "progress", ...} and
{"type": "event", ...}; it writes its result (or its error) to a JSON file in
the scratch folder. It receives input files only through that folder (or paths
bound read-only on purpose).

`isolation="none"` keeps only the resource limits; it exists for development
machines without bubblewrap and must be chosen explicitly
(MODELPRESS_SANDBOX_ISOLATION=none).
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import queue
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.bubblewrap import (
    ISOLATIONS,
    SandboxUnavailable,
    bubblewrap_command,
    check_isolation,
    describe_isolation,
)
from worker.crash_report import FAULTHANDLER_FILE, native_crash_error

PROJECT_ROOT = Path(__file__).resolve().parent.parent
__all__ = [
    "ISOLATIONS",
    "Limits",
    "SandboxOutcome",
    "SandboxUnavailable",
    "WarmSandbox",
    "bubblewrap_command",
    "check_isolation",
    "describe_isolation",
    "run_sandboxed",
]
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
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(scratch),
        "TMPDIR": str(scratch),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(PROJECT_ROOT),
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TORCHINDUCTOR_CACHE_DIR": str(scratch / "inductor"),
        # transformers and timm never reach for the hub: models are built from the upload alone
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(scratch / "huggingface"),
    }


def _describe_exit(code: int, limits: Limits) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        hints = {
            "SIGKILL": f"killed (out of memory: the limit is {limits.memory_bytes} bytes, or the time limit)",
            "SIGXCPU": f"CPU time limit of {limits.cpu_seconds} s exceeded",
            "SIGXFSZ": f"file size limit of {limits.file_bytes} bytes exceeded",
            "SIGSEGV": "the model code crashed (segmentation fault)",
        }
        return hints.get(name, f"terminated by {name}")
    if code > 128 and code - 128 in signal.valid_signals():  # bwrap reports its child's signal as 128 + n
        return _describe_exit(-(code - 128), limits)
    return f"exited with status {code}"


class WarmSandbox:
    """A sandboxed child started ahead of its job: torch is imported, the boundary is up, nothing is loaded.

    It is bound to its own fresh scratch folder and serves exactly one job (or inspection); the next job gets
    a new one. So a warm start changes when the child is made, never what it can see.
    """

    def __init__(self, folder: Path, limits: Limits, isolation: str) -> None:
        self.folder, self.limits, self.isolation = folder.resolve(), limits, isolation
        self.folder.mkdir(parents=True, exist_ok=True)
        # held while the folder is in use: the scratch sweeper skips locked folders
        self._lock = open(self.folder / ".in-use", "w")
        import fcntl

        fcntl.flock(self._lock, fcntl.LOCK_EX)
        environment = _clean_environment(self.folder, limits.threads)
        command = [sys.executable, "-m", "worker.sandbox", "--warm"]
        if isolation == "bubblewrap":
            command = bubblewrap_command(self.folder, environment) + command
        with open(self.folder / "stderr.log", "wb") as stderr:
            self.child = subprocess.Popen(
                command,
                cwd=self.folder,
                env=environment,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                preexec_fn=_apply_limits(limits),
            )

    def fits(self, limits: Limits, isolation: str) -> bool:
        """Alive, and started with the same process limits (the wall clock is the supervisor's, not the child's)."""
        same_limits = dataclasses.replace(self.limits, wall_seconds=0) == dataclasses.replace(limits, wall_seconds=0)
        return self.child.poll() is None and same_limits and self.isolation == isolation

    def discard(self) -> None:
        """Stop the child (if it still waits) and remove its folder."""
        if self.child.poll() is None:
            _kill_group(self.child)
            self.child.wait()
        self._lock.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def run_sandboxed(
    mode: str,
    request: dict[str, Any],
    scratch: Path,
    limits: Limits,
    *,
    on_message: Callable[[dict[str, Any]], None] = lambda m: None,
    should_stop: Callable[[], bool] = lambda: False,
    poll_s: float = 1.0,
    isolation: str = "bubblewrap",
    read_only: Sequence[Path] = (),
    warm: WarmSandbox | None = None,
) -> SandboxOutcome:
    """Run `worker.sandbox` in an isolated, limited child; `should_stop` is polled and kills the child when true.

    `scratch` is the child's only writable folder and its working directory; input files must be inside it
    or listed in `read_only`. With `warm`, the job runs in that pre-started child, whose folder must be
    `scratch` (`read_only` is then not available). Whatever ends this call (a result, a timeout, a cancel, or an exception such as
    Celery's soft time limit raised in this thread) kills the child's whole process tree before returning.
    """
    scratch = scratch.resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    request_path, result_path = scratch / "request.json", scratch / "result.json"
    request_path.write_text(json.dumps(request))
    result_path.unlink(missing_ok=True)
    stderr_path = scratch / "stderr.log"
    if warm is not None:
        if warm.folder != scratch or read_only or not warm.fits(limits, isolation):
            raise ValueError("a warm sandbox serves only its own folder, limits and isolation")
        child = warm.child
        assert child.stdin is not None
        try:
            child.stdin.write((json.dumps([mode, str(request_path), str(result_path)]) + "\n").encode())
            child.stdin.close()
        except BrokenPipeError:
            pass  # it died while waiting: the supervision below reports how
    else:
        environment = _clean_environment(scratch, limits.threads)
        command = [sys.executable, "-m", "worker.sandbox", mode, str(request_path), str(result_path)]
        if isolation == "bubblewrap":
            command = bubblewrap_command(scratch, environment, read_only) + command
        elif isolation != "none":
            raise SandboxUnavailable(f"unknown sandbox isolation {isolation!r}")
        with open(stderr_path, "wb") as stderr:
            child = subprocess.Popen(
                command,
                cwd=scratch,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                preexec_fn=_apply_limits(limits),
            )
    try:
        return _supervise(child, limits, result_path, stderr_path, on_message, should_stop, poll_s)
    finally:
        # Also reached when the caller's thread is interrupted (a soft time limit): never leave the child running.
        if child.poll() is None:
            _kill_group(child)
            child.wait()


def _supervise(
    child: subprocess.Popen[bytes],
    limits: Limits,
    result_path: Path,
    stderr_path: Path,
    on_message: Callable[[dict[str, Any]], None],
    should_stop: Callable[[], bool],
    poll_s: float,
) -> SandboxOutcome:
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
        return SandboxOutcome(
            False,
            None,
            {"error": "TimeLimitExceeded", "detail": f"the job ran past its {limits.wall_seconds:.0f} s limit"},
        )
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
    tail = stderr_path.read_text(errors="replace")[-2000:].strip()
    crash = native_crash_error(code, result_path.parent, tail)
    if crash is not None:
        return SandboxOutcome(False, None, crash)
    tail = tail[-600:]
    detail = f"the sandboxed process {_describe_exit(code, limits)}"
    if tail:
        detail += f"; last output: {tail.splitlines()[-1][:300]}"
    return SandboxOutcome(False, None, {"error": "SandboxFailure", "detail": detail})


def _kill_group(child: subprocess.Popen[bytes]) -> None:
    # The child leads its own process group (setsid); under bubblewrap the sandbox's PID namespace dies
    # with it (--die-with-parent), which takes every process the model started.
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
    _prepare_crash_report(Path(result_path).parent)
    try:
        if mode == "job":
            from worker.compression.pipeline import JobRequest, Reporter, run_job

            reporter = Reporter(
                progress=lambda fraction, stage: _emit({"type": "progress", "fraction": fraction, "stage": stage}),
                event=lambda kind, data: _emit({"type": "event", "kind": kind, "data": data}),
            )
            result = run_job(JobRequest.from_dict(request), reporter)
        elif mode == "inspect":
            from worker.compression import breadcrumbs
            from worker.compression.inspect import inspect_model

            breadcrumbs.stage("inspecting the upload")
            breadcrumbs.operation(f"loading the {request['format']} model file and running it")

            result = inspect_model(
                Path(request["path"]), request["format"], request.get("architecture"), request.get("inputs")
            )
        elif mode == "trial":
            from worker.compression.scheme_trials import TrialRequest, run_trials

            result = run_trials(TrialRequest.from_dict(request), Path(result_path).parent)
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


def _prepare_crash_report(scratch: Path) -> None:
    """Breadcrumbs and a faulthandler dump in the scratch folder, so a native crash can be explained."""
    import faulthandler

    from worker.compression import breadcrumbs

    breadcrumbs.leave_in(scratch)
    # kept open for the life of the child: faulthandler writes to the descriptor from its signal handler
    faulthandler.enable(file=open(scratch / FAULTHANDLER_FILE, "w"), all_threads=True)  # noqa: SIM115


def _warm_main() -> int:
    """Pay the interpreter start, the imports and first-call costs before the job exists; serve exactly one job.

    The optional steps stop as soon as the job arrives: a job that comes early waits for at most the step in
    progress, and imports lazily what it needs of the rest.
    """
    import worker.compression.inspect  # noqa: F401
    import worker.compression.pipeline  # noqa: F401
    from worker.sandbox_warmup import job_waiting, prewarm_steps

    for step in prewarm_steps():
        if job_waiting():
            break
        try:
            step()
        except Exception:  # a warm-up that fails here only leaves its cost to the job, which reports any real error
            pass
    _emit({"type": "warm"})
    line = sys.stdin.readline()
    if not line:
        return 0  # the supervisor let us go unused
    mode, request_path, result_path = json.loads(line)
    return _child_main(mode, request_path, result_path)


def _exit_now(code: int) -> None:
    """Leave without the interpreter's teardown: with torch and its compiler stack loaded it took about 2 s
    (measured under bubblewrap) after the result was already written, all of it on the job's wall time."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    if sys.argv[1:] == ["--warm"]:
        _exit_now(_warm_main())
    _exit_now(_child_main(sys.argv[1], sys.argv[2], sys.argv[3]))
