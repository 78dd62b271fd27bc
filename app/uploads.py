"""Receiving uploaded files: bounded, hashed while streaming, stored atomically."""

from __future__ import annotations

import hashlib
import logging
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import UploadFile

from app.config import get_settings
from app.errors import TooLarge

CHUNK = 1024 * 1024
# how often the API looks for partial uploads left behind (e.g. by a crashed API process)
SWEEP_INTERVAL_S = 3600.0
log = logging.getLogger(__name__)

_writing_lock = threading.Lock()
_writing: set[Path] = set()  # this process's uploads in progress; the sweep never touches them


def incoming_folder() -> Path:
    return get_settings().data_dir / "incoming"


def sweep_incoming(max_age_s: float | None = None) -> list[Path]:
    """Remove files in incoming/ untouched for `max_age_s` (default MODELPRESS_INCOMING_MAX_AGE_S).

    An upload in progress rewrites its file every chunk, so its modification time stays recent in
    whichever API process owns it; those of this process are also skipped by name.
    """
    age = get_settings().incoming_max_age_s if max_age_s is None else max_age_s
    folder = incoming_folder()
    if not folder.is_dir():
        return []
    cutoff = time.time() - age
    with _writing_lock:
        live = set(_writing)
    removed = []
    for path in folder.iterdir():
        try:
            if path in live or not path.is_file() or path.stat().st_mtime > cutoff:
                continue
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            continue  # finished and removed by its upload meanwhile
    if removed:
        log.info("removed %d partial upload(s) older than %.0f s from %s", len(removed), age, folder)
    return removed


@dataclass
class ReceivedFile:
    path: Path
    size_bytes: int
    sha256: str
    filename: str


@contextmanager
def receive_upload(upload: UploadFile) -> Iterator[ReceivedFile]:
    """Copy an upload to a temporary file with a byte cap; the file is removed afterwards."""
    settings = get_settings()
    folder = incoming_folder()
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    with tempfile.NamedTemporaryFile(dir=folder, delete=False, prefix="upload-") as out:
        path = Path(out.name)
        with _writing_lock:
            _writing.add(path)
        try:
            while chunk := upload.file.read(CHUNK):
                size += len(chunk)
                if size > settings.max_upload_bytes:
                    raise TooLarge(f"upload exceeds {settings.max_upload_bytes} bytes")
                digest.update(chunk)
                out.write(chunk)
        except BaseException:
            _forget(path)
            raise
    try:
        yield ReceivedFile(path, size, digest.hexdigest(), upload.filename or "upload")
    finally:
        _forget(path)


def _forget(path: Path) -> None:
    path.unlink(missing_ok=True)
    with _writing_lock:
        _writing.discard(path)
