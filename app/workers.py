"""The worker pool as the API sees it: live workers (recent heartbeat) and what they can run.

MODELPRESS_WORKER_STALE_AFTER_S      a worker without a heartbeat for this long is gone (default 30;
                                     workers beat every 10 s)
MODELPRESS_REQUIRE_LIVE_WORKER       true: a job no live worker can run is refused with 422 at submit;
                                     false (default): it is queued with a warning in spec["warnings"]
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select

from app.config import get_settings
from app.tables import WorkerRecord, utcnow

WORKER_STALE_AFTER_S = 30  # the default of MODELPRESS_WORKER_STALE_AFTER_S


def stale_after_s() -> float:
    return get_settings().worker_stale_after_s


def require_live_worker() -> bool:
    return get_settings().require_live_worker


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def live_workers(session: Any) -> list[WorkerRecord]:
    cutoff = utcnow() - timedelta(seconds=stale_after_s())
    workers = session.scalars(select(WorkerRecord).order_by(WorkerRecord.name)).all()
    return [w for w in workers if _aware(w.last_heartbeat) >= cutoff]


def live_devices(workers: list[WorkerRecord]) -> list[str]:
    return sorted({d for w in workers for d in (w.capabilities or {}).get("devices", [])})


def device_problem(session: Any, device: str) -> str | None:
    """Why no live worker can run a job on `device`, or None when one can (or the pool is not known yet).

    A deployment where no worker has ever registered (fresh install; `make run` starts its worker a few
    seconds after the API) is not judged: the job just waits in the queue for the first worker.
    Clean shutdowns remove their row, so "registered" means rows present, live or stale.
    """
    if not session.scalar(select(func.count()).select_from(WorkerRecord)):
        return None
    live = live_workers(session)
    devices = live_devices(live)
    if device in devices:
        return None
    if not live:
        return (
            f"no live worker can run a job on device {device!r}: no worker has sent a heartbeat "
            f"in the last {stale_after_s():g} s"
        )
    return f"no live worker can run a job on device {device!r}: live workers offer devices {devices}"


def max_train_devices(session: Any, device: str) -> int | None:
    """The most data-parallel training processes one live worker offers on `device` (CUDA devices, or CPU
    cores), or None when no live worker reports it (train.devices is then only held to its fixed bound)."""
    counts = []
    for worker in live_workers(session):
        caps = worker.capabilities or {}
        if device not in caps.get("devices", []):
            continue
        count = (caps.get("cuda") or {}).get("count") if device == "cuda" else caps.get("cpu_count")
        if isinstance(count, int) and count >= 1:
            counts.append(count)
    return max(counts) if counts else None
