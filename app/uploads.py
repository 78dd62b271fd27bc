"""Receiving uploaded files: bounded, hashed while streaming, stored atomically."""
from __future__ import annotations

import hashlib
import tempfile
from contextlib import contextmanager
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fastapi import UploadFile

from app.config import get_settings
from app.errors import TooLarge

CHUNK = 1024 * 1024


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
    folder = settings.data_dir / "incoming"
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    with tempfile.NamedTemporaryFile(dir=folder, delete=False, prefix="upload-") as out:
        path = Path(out.name)
        try:
            while chunk := upload.file.read(CHUNK):
                size += len(chunk)
                if size > settings.max_upload_bytes:
                    raise TooLarge(f"upload exceeds {settings.max_upload_bytes} bytes")
                digest.update(chunk)
                out.write(chunk)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
    try:
        yield ReceivedFile(path, size, digest.hexdigest(), upload.filename or "upload")
    finally:
        path.unlink(missing_ok=True)
