"""The service as it is deployed: a uvicorn API process and a real Celery worker process.

Embedded mode is what `make run` gives (SQLite, the file-system broker, local files);
Postgres + Redis mode is the production setup, on a database created for the run and
dropped afterwards, and a Redis database number that was empty when the run began.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.common import PYTHON, ROOT, log
from modelpress.job_status import TERMINAL, JobStatus


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the benchmark process dies, so no service outlives it."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def check_postgres(url: str) -> str | None:
    """None when reachable, else why not."""
    try:
        from sqlalchemy import create_engine, text

        engine = create_engine(url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as error:
        return f"PostgreSQL at {url} is not reachable: {type(error).__name__}: {str(error).splitlines()[0][:200]}"


def check_redis(url: str) -> str | None:
    try:
        import redis

        redis.Redis.from_url(url, socket_connect_timeout=3).ping()
        return None
    except Exception as error:
        return f"Redis at {url} is not reachable: {type(error).__name__}: {error}"


def parse_time(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def read_status_kib(pid: int, field: str) -> int | None:
    """A figure of /proc/<pid>/status in KiB (VmRSS, VmHWM)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class Service:
    """API (uvicorn subprocess) + optional worker (the command `modelpress worker` runs), one tenant key."""

    def __init__(
        self,
        mode: str,
        folder: Path,
        *,
        postgres_url: str | None = None,
        redis_url: str | None = None,
        worker: bool = True,
    ) -> None:
        if mode not in ("embedded", "postgres"):
            raise ValueError(mode)
        self.mode, self.folder, self.with_worker = mode, folder, worker
        self.postgres_admin_url, self.redis_server_url = postgres_url, redis_url
        self.database_name: str | None = None
        self.redis_url: str | None = None
        self.api: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.key = ""
        self.env: dict[str, str] = {}
        self.client: Any = None
        # worker processes that died during the run (and were started again): what their log said
        self.incidents: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Service:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        import httpx

        self.folder.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")}
        env.update(
            MODELPRESS_DATA_DIR=str(self.folder / "data"),
            MODELPRESS_RATE_LIMIT_PER_MINUTE="10000000",
            MODELPRESS_MAX_QUEUED_JOBS_PER_TENANT="1000",
            PYTHONUNBUFFERED="1",
        )
        if self.mode == "postgres":
            assert self.postgres_admin_url and self.redis_server_url
            env["MODELPRESS_DATABASE_URL"] = self._create_database()
            env["MODELPRESS_BROKER_URL"] = self.redis_url = self._pick_redis_database()
        self.env = env
        created = subprocess.run(
            [PYTHON, "-m", "modelpress.cli", "keys", "create", "--tenant", "bench"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if created.returncode != 0:
            raise RuntimeError(f"modelpress keys create failed: {created.stderr[-2000:]}")
        self.key = created.stdout.strip().splitlines()[-1]
        self.api = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "uvicorn",
                "app.main:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            cwd=ROOT,
            env=env,
            stdout=open(self.folder / "api.log", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.client = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=httpx.Timeout(600.0, connect=10.0),
        )
        self._wait(lambda: self._healthy(), 120, "the API to answer /healthz", self.folder / "api.log")
        if self.with_worker:
            self._start_worker()
            self._wait(
                lambda: self.get("/v1/workers").get("items"), 120, "the worker to register", self.folder / "worker.log"
            )

    def _start_worker(self) -> None:
        from modelpress.cli import worker_command

        self.worker = subprocess.Popen(
            worker_command("cpu", 1),
            cwd=ROOT,
            env=dict(self.env, MODELPRESS_WORKER_QUEUES="cpu"),
            stdout=open(self.folder / "worker.log", "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    def check_worker(self) -> bool:
        """Start the worker again if it died (recording why); True when it had to."""
        if not self.with_worker or self.worker is None or self.worker.poll() is None:
            return False
        log_text = (self.folder / "worker.log").read_text(errors="replace")
        lines = [line for line in log_text.splitlines() if "CRITICAL" in line or "Unrecoverable" in line]
        reason = lines[-1] if lines else log_text[-600:]
        try:
            reason = str(json.loads(reason).get("message", reason))
        except (ValueError, AttributeError):
            pass
        reason = reason[:600]
        self.incidents.append({"at": time.strftime("%H:%M:%S"), "exit_code": self.worker.returncode, "log": reason})
        log(f"the {self.mode} worker died (exit {self.worker.returncode}); starting it again: {reason[:200]}")
        self._start_worker()
        return True

    def terminate(self) -> None:
        """Ask the worker and the API to stop (without waiting)."""
        for process in (self.worker, self.api):
            if process is not None and process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        self.terminate()
        for process in (self.worker, self.api):
            if process is None or process.poll() is not None:
                continue
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait(10)
        self.worker = self.api = None
        if self.database_name:
            from sqlalchemy import create_engine, text

            engine = create_engine(self.postgres_admin_url, isolation_level="AUTOCOMMIT")  # type: ignore[arg-type]
            with engine.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{self.database_name}" WITH (FORCE)'))
            engine.dispose()
            self.database_name = None
        if self.redis_url:
            import redis

            redis.Redis.from_url(self.redis_url).flushdb()
            self.redis_url = None

    def _create_database(self) -> str:
        from sqlalchemy import create_engine, make_url, text

        name = f"modelpress_bench_{secrets.token_hex(4)}"
        engine = create_engine(self.postgres_admin_url, isolation_level="AUTOCOMMIT")  # type: ignore[arg-type]
        with engine.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        self.database_name = name
        return make_url(self.postgres_admin_url).set(database=name).render_as_string(hide_password=False)

    def _pick_redis_database(self) -> str:
        """A Redis database number that holds no keys now (so no one else's queue is touched)."""
        import redis

        base = self.redis_server_url.rstrip("/")  # type: ignore[union-attr]
        empty = []
        for index in range(1, 16):
            try:
                if redis.Redis.from_url(f"{base}/{index}").dbsize() == 0:
                    empty.append(index)
            except Exception:
                continue
        if not empty:
            raise RuntimeError("no empty Redis database number (1-15) to run in")
        return f"{base}/{secrets.choice(empty)}"

    def _healthy(self) -> bool:
        import httpx

        if self.api is not None and self.api.poll() is not None:
            raise RuntimeError(f"the API exited: {(self.folder / 'api.log').read_text(errors='replace')[-2000:]}")
        try:
            return self.client.get("/healthz", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    @staticmethod
    def _wait(predicate: Any, timeout: float, what: str, log_path: Path | None = None, interval: float = 0.2) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(interval)
        tail = log_path.read_text(errors="replace")[-2000:] if log_path and log_path.exists() else ""
        raise RuntimeError(f"timed out after {timeout} s waiting for {what}\n{tail}")

    # ------------------------------------------------------------------ API calls

    def get(self, path: str) -> Any:
        response = self.client.get(path)
        response.raise_for_status()
        return response.json()

    def upload_model(self, path: Path, architecture: dict[str, Any]) -> str:
        with open(path, "rb") as handle:
            response = self.client.post(
                "/v1/models",
                files={"file": (path.name, handle)},
                data={"format": "state_dict", "architecture": json.dumps(architecture)},
            )
        if response.status_code != 201:
            raise RuntimeError(f"model upload answered {response.status_code}: {response.text[:500]}")
        model_id = response.json()["id"]
        model = self._wait(
            lambda: not self.check_worker() and (m := self.get(f"/v1/models/{model_id}"))["status"] != "pending" and m,
            300,
            "the model inspection",
            self.folder / "worker.log",
        )
        if model["status"] != "ready":
            raise RuntimeError(f"model rejected: {model.get('inspection')}")
        return str(model_id)

    def upload_dataset(self, path: Path) -> str:
        with open(path, "rb") as handle:
            response = self.client.post("/v1/datasets", files={"file": (path.name, handle)})
        if response.status_code != 201:
            raise RuntimeError(f"dataset upload answered {response.status_code}: {response.text[:500]}")
        return str(response.json()["id"])

    def run_job(self, spec: dict[str, Any], timeout: float = 900, poll_s: float = 0.05) -> dict[str, Any]:
        """Submit and follow a job; returns the final job plus client-side timings (perf_counter seconds)."""
        submitted = time.perf_counter()
        response = self.client.post("/v1/jobs", json=spec)
        if response.status_code != 202:
            raise RuntimeError(f"job submit answered {response.status_code}: {response.text[:500]}")
        accepted = time.perf_counter()
        job_id = response.json()["id"]
        seen_running: float | None = None
        restarted = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            restarted = self.check_worker() or restarted
            job = self.get(f"/v1/jobs/{job_id}")
            now = time.perf_counter()
            if job["status"] != JobStatus.QUEUED and seen_running is None:
                seen_running = now
            if job["status"] in TERMINAL:
                if job["status"] != JobStatus.SUCCEEDED:
                    raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}")
                created, started, finished = (
                    parse_time(job.get(k)) for k in ("created_at", "started_at", "finished_at")
                )
                return {
                    "job": job,
                    "worker_restarted": restarted,
                    "client_wall_s": now - submitted,
                    "submit_s": accepted - submitted,
                    "client_to_running_s": (seen_running or now) - submitted,
                    "server_queue_s": (started - created) if started and created else None,
                    "server_total_s": (finished - created) if finished and created else None,
                    "server_run_s": (finished - started) if finished and started else None,
                }
            time.sleep(poll_s)
        tail = (self.folder / "worker.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"job {job_id} did not finish in {timeout} s\n{tail}")


def service_modes(
    size_modes: tuple[str, ...], postgres_url: str | None, redis_url: str | None, require_services: bool
) -> tuple[list[str], dict[str, str]]:
    """The modes to run and, for the others, why they were left out."""
    modes, skipped = [], {}
    for mode in size_modes:
        if mode == "postgres":
            if not postgres_url or not redis_url:
                skipped[mode] = "Postgres + Redis mode not asked for (--no-postgres)"
                continue
            problem = check_postgres(postgres_url) or check_redis(redis_url)
            if problem:
                if require_services:
                    raise RuntimeError(problem)
                skipped[mode] = problem
                log(f"skipping Postgres + Redis mode: {problem}")
                continue
        modes.append(mode)
    return modes, skipped


class ServicePool:
    """Services started once per mode and shared by the sections of one run (model and datasets uploaded once)."""

    def __init__(
        self,
        folder: Path,
        *,
        postgres_url: str | None,
        redis_url: str | None,
        require_services: bool = False,
        allowed_modes: tuple[str, ...] | None = None,
    ) -> None:
        self.folder, self.postgres_url, self.redis_url = folder, postgres_url, redis_url
        self.require_services, self.allowed_modes = require_services, allowed_modes
        self.live: dict[str, dict[str, Any]] = {}

    def modes(self, wanted: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
        allowed = tuple(m for m in wanted if self.allowed_modes is None or m in self.allowed_modes)
        modes, skipped = service_modes(allowed, self.postgres_url, self.redis_url, self.require_services)
        for mode in wanted:
            if mode not in allowed:
                skipped[mode] = "not asked for in this run"
        return modes, skipped

    def get(self, mode: str, assets: Any, model_name: str) -> dict[str, Any]:
        """{"service", "model_id", "train_id", "test_id", "started_s"} for `mode`, started on first use."""
        if mode not in self.live:
            from bench.common import MODELS

            log(f"starting the service in {mode} mode")
            started = time.perf_counter()
            service = Service(mode, self.folder / mode, postgres_url=self.postgres_url, redis_url=self.redis_url)
            service.__enter__()
            try:
                ready = {
                    "service": service,
                    "model_id": service.upload_model(
                        assets.model_paths[model_name], MODELS[model_name]["architecture"]
                    ),
                    "train_id": service.upload_dataset(assets.train_path),
                    "test_id": service.upload_dataset(assets.test_path),
                }
            except BaseException:
                service.stop()
                raise
            ready["started_s"] = round(time.perf_counter() - started, 2)
            self.live[mode] = ready
        return self.live[mode]

    def release(self, mode: str) -> None:
        """Stop the service of `mode` now (a later get() starts a fresh one)."""
        ready = self.live.pop(mode, None)
        if ready is not None:
            ready["service"].stop()

    def close(self) -> None:
        for ready in self.live.values():
            ready["service"].terminate()
        for ready in self.live.values():
            ready["service"].stop()
        self.live.clear()


MODE_LABELS = {"embedded": "embedded (SQLite + file-system broker)", "postgres": "Postgres + Redis"}
