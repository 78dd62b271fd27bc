"""Artifact and upload storage, picked by URL scheme: file:// (default) or s3://bucket/prefix."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

CHUNK = 1024 * 1024


class ArtifactStore(Protocol):
    def put_file(self, key: str, source: Path) -> None:
        """Store `source` under `key`; readers never see a half-written object."""

    def fetch_to(self, key: str, destination: Path) -> None:
        """Copy the object to a local file."""

    def iter_bytes(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """Stream the object."""

    def delete(self, key: str) -> None: ...

    def exists(self, key: str) -> bool: ...

    def check(self) -> None:
        """Raise when the store cannot be reached (for /readyz)."""


class FileStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"storage key escapes the store: {key!r}")
        return path

    def put_file(self, key: str, source: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        # write beside the target, then rename: atomic on one file system
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
                shutil.copyfileobj(src, out, CHUNK)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    def fetch_to(self, key: str, destination: Path) -> None:
        shutil.copyfile(self._path(key), destination)

    def iter_bytes(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        with open(self._path(key), "rb") as handle:
            while chunk := handle.read(chunk_size):
                yield chunk

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def check(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise OSError(f"storage folder {self.root} is not writable")


def store_from_url(url: str) -> ArtifactStore:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return FileStore(Path(parsed.path))
    if parsed.scheme == "s3":
        from app.storage_s3 import S3Store

        return S3Store(bucket=parsed.netloc, prefix=parsed.path.lstrip("/"))
    raise ValueError(f"unsupported storage URL {url!r} (file:// or s3://)")


@lru_cache
def get_store() -> ArtifactStore:
    from app.config import get_settings

    return store_from_url(get_settings().resolved_storage_url)
