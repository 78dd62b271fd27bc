"""Partial uploads left in incoming/ (an API process crashed mid-upload) are removed at start and on a timer."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

from fastapi import UploadFile
from fastapi.testclient import TestClient


class SweepingReader(io.BytesIO):
    """An upload body that runs the sweep (with no age threshold) between its chunks."""

    def __init__(self, data: bytes, folder: Path) -> None:
        super().__init__(data)
        self.folder, self.seen_during_upload = folder, []

    def read(self, size: int = -1) -> bytes:
        from app.uploads import sweep_incoming

        sweep_incoming(max_age_s=0)
        self.seen_during_upload.append(sorted(p.name for p in self.folder.iterdir()))
        return super().read(size)


def test_stale_partial_uploads_are_swept_at_start_and_live_ones_kept(service_env) -> None:  # type: ignore[no-untyped-def]
    from app.config import get_settings
    from app.main import create_app
    from app.migrate import upgrade
    from app.uploads import CHUNK, receive_upload, sweep_incoming

    service_env(incoming_max_age_s="600")
    upgrade()
    folder = get_settings().data_dir / "incoming"
    folder.mkdir(parents=True)
    stale, fresh = folder / "upload-crashed", folder / "upload-recent"
    stale.write_bytes(b"x" * 1000)
    fresh.write_bytes(b"y" * 1000)
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    with TestClient(create_app()) as client:
        assert client.get("/healthz").status_code == 200
        assert not stale.exists() and fresh.exists()

    # an upload in progress survives even a sweep with no age threshold; what it left is removed after
    reader = SweepingReader(b"z" * (3 * CHUNK), folder)
    with receive_upload(UploadFile(reader, filename="m.pt")) as received:
        assert received.size_bytes == 3 * CHUNK and received.path.read_bytes() == b"z" * (3 * CHUNK)
        assert not fresh.exists()  # the leftover went at the first sweep, the upload's own file stayed
        assert sweep_incoming(max_age_s=0) == [] and received.path.exists()  # being stored: still in use
    assert len(reader.seen_during_upload) >= 3
    assert all(names == [received.path.name] for names in reader.seen_during_upload)
    assert list(folder.iterdir()) == []
