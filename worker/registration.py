"""Workers register their capabilities and heartbeat; /v1/workers lists the live ones."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from celery.signals import worker_init, worker_process_init, worker_process_shutdown, worker_ready, worker_shutdown

from app.config import get_settings
from app.db import session_scope
from app.tables import WorkerRecord, utcnow

log = logging.getLogger("modelpress.registration")
HEARTBEAT_S = 10.0
_stop = threading.Event()


def capabilities() -> dict[str, Any]:
    import torch

    from modelpress.catalog import SCHEMES
    from worker.sandbox import describe_isolation

    devices = ["cpu"]
    info: dict[str, Any] = {"torch": torch.__version__, "cpu_count": os.cpu_count()}
    try:
        import torchao

        info["torchao"] = torchao.__version__
    except Exception:
        info["torchao"] = None
    if torch.cuda.is_available():
        devices.append("cuda")
        props = torch.cuda.get_device_properties(0)
        info["cuda"] = {
            "name": props.name,
            "memory_bytes": props.total_memory,
            "compute_capability": float(f"{props.major}.{props.minor}"),
            "count": torch.cuda.device_count(),
        }
    info["devices"] = devices
    info["isolation"] = describe_isolation(get_settings().sandbox_isolation)
    info["schemes"] = sorted(f"{s.method}:{s.name}" for s in SCHEMES if any(d in devices for d in s.devices))
    return info


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def heartbeat(name: str, queues: list[str], caps: dict[str, Any]) -> None:
    with session_scope() as session:
        record = session.get(WorkerRecord, name)
        if record is None:
            session.add(WorkerRecord(name=name, queues=queues, capabilities=caps))
        else:
            record.last_heartbeat, record.queues, record.capabilities = utcnow(), queues, caps


def deregister(name: str) -> None:
    with session_scope() as session:
        record = session.get(WorkerRecord, name)
        if record is not None:
            session.delete(record)


SWEEP_EVERY_S = 600.0


def require_isolation() -> None:
    """A worker without its sandbox would run users' files in the open: refuse to start, with the fix."""
    from worker.sandbox import check_isolation

    isolation = get_settings().sandbox_isolation
    problem = check_isolation(isolation)
    if problem:
        log.critical(
            "refusing to start: %s. To accept the risk on a development machine only, set "
            "MODELPRESS_SANDBOX_ISOLATION=none.",
            problem,
        )
        raise SystemExit(
            f"modelpress worker: {problem} (or set MODELPRESS_SANDBOX_ISOLATION=none on a "
            "development machine to accept the risk)"
        )
    if isolation == "none":
        log.warning(
            "sandbox isolation is OFF (MODELPRESS_SANDBOX_ISOLATION=none): users' model files run with "
            "this worker's user, files and network. Development only."
        )


def sweep_leftovers() -> None:
    from worker.slots import sweep_scratch

    settings = get_settings()
    try:
        sweep_scratch(settings.scratch_dir, settings.leftover_max_age_s)
    except Exception as error:
        log.warning("scratch sweep failed: %s", error)


@worker_init.connect  # type: ignore[untyped-decorator]  # celery ships no type information
def _on_init(sender: Any = None, **_: Any) -> None:
    require_isolation()


@worker_process_init.connect  # type: ignore[untyped-decorator]  # celery ships no type information
def _on_pool_process_init(**_: Any) -> None:
    # each pool process (worker slot) starts its first sandbox ahead of its first job
    from worker.slots import prestart_sandbox

    prestart_sandbox()


@worker_process_shutdown.connect  # type: ignore[untyped-decorator]  # celery ships no type information
def _on_pool_process_shutdown(**_: Any) -> None:
    from worker.slots import discard_warm_sandbox

    discard_warm_sandbox()


@worker_ready.connect  # type: ignore[untyped-decorator]  # celery ships no type information
def _on_ready(sender: Any = None, **_: Any) -> None:
    name = worker_name()
    queues = [q.strip() for q in get_settings().worker_queues.split(",") if q.strip()]
    caps = capabilities()

    def loop() -> None:
        next_sweep = 0.0
        while True:
            try:
                heartbeat(name, queues, caps)
            except Exception as error:
                log.warning("worker heartbeat failed: %s", error)
            if time.monotonic() >= next_sweep:  # killed attempts leave scratch folders behind
                sweep_leftovers()
                next_sweep = time.monotonic() + SWEEP_EVERY_S
            if _stop.wait(HEARTBEAT_S):
                return

    threading.Thread(target=loop, name="worker-heartbeat", daemon=True).start()


@worker_shutdown.connect  # type: ignore[untyped-decorator]  # celery ships no type information
def _on_shutdown(sender: Any = None, **_: Any) -> None:
    _stop.set()
    try:
        deregister(worker_name())
    except Exception as error:
        log.warning("worker deregistration failed: %s", error)
