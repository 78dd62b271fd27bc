"""A worker slot's scratch folders and its pre-started (warm) sandbox.

Each job gets a folder of its own, locked while in use so the sweeper leaves it alone; when the
slot's warm sandbox fits the job, that sandbox's folder is the job's folder. Either way the
folder and its child serve one job only, and the next sandbox is started right after.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from app.config import get_settings
from worker.sandbox import Limits, WarmSandbox

log = logging.getLogger("modelpress.runner")

LOCK_FILE = ".in-use"


@contextmanager
def scratch_folder(path: Path) -> Iterator[Path]:
    """A job's scratch folder, locked while in use (the sweeper skips locked folders) and removed after."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path / LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)


_warm: WarmSandbox | None = None  # this worker slot's next sandbox, started ahead of its job


def slot_limits(threads: int | None = None, wall_seconds: float | None = None) -> Limits:
    settings = get_settings()
    return Limits(
        memory_bytes=settings.sandbox_memory_bytes,
        cpu_seconds=settings.sandbox_cpu_seconds,
        file_bytes=settings.sandbox_file_bytes,
        open_files=settings.sandbox_open_files,
        wall_seconds=wall_seconds or settings.job_soft_time_limit_s,
        threads=max(1, threads or settings.worker_threads),
    )


def prestart_sandbox() -> None:
    """Start this slot's next sandbox now, so the next job does not wait for Python and torch to start."""
    global _warm
    settings = get_settings()
    if not settings.warm_sandbox or (_warm is not None and _warm.child.poll() is None):
        return
    try:
        _warm = WarmSandbox(
            settings.scratch_dir / f"warm-{os.getpid()}-{time.monotonic_ns()}",
            slot_limits(),
            settings.sandbox_isolation,
        )
    except Exception as error:  # a cold start still works; say why the warm one did not
        log.warning("could not pre-start a sandbox: %s", error)
        _warm = None


def discard_warm_sandbox() -> None:
    global _warm
    if _warm is not None:
        _warm.discard()
        _warm = None


@contextmanager
def sandbox_slot(name: str, limits: Limits) -> Iterator[tuple[Path, WarmSandbox | None]]:
    """A scratch folder for one job, with the pre-started sandbox bound to it when that one fits.

    Either way the folder and its child serve this job only; the next one is pre-started afterwards.
    """
    global _warm
    settings = get_settings()
    warm, _warm = _warm, None
    try:
        if warm is not None and warm.fits(limits, settings.sandbox_isolation):
            yield warm.folder, warm
        else:
            if warm is not None:
                warm.discard()
                warm = None
            with scratch_folder(settings.scratch_dir / name) as folder:
                yield folder, None
    finally:
        if warm is not None:
            warm.discard()
        prestart_sandbox()


def sweep_scratch(scratch_dir: Path, max_age_s: float) -> list[str]:
    """Remove scratch folders that no live process holds (killed attempts), older than `max_age_s`."""
    removed: list[str] = []
    if not scratch_dir.exists():
        return removed
    now = time.time()
    for entry in scratch_dir.iterdir():
        try:
            if now - entry.stat().st_mtime < max_age_s:
                continue
            if entry.is_dir():
                lock_path = entry / LOCK_FILE
                if lock_path.exists():
                    with open(lock_path) as lock:
                        try:
                            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        except BlockingIOError:
                            continue  # a live attempt holds it
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry.name)
        except FileNotFoundError:
            continue
    if removed:
        log.info("swept %d scratch leftovers: %s", len(removed), removed[:10])
    return removed
