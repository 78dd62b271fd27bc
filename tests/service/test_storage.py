"""One storage suite, run against file:// and against s3:// served by moto's server mode on loopback."""

from __future__ import annotations

import hashlib
import os
import secrets
import urllib.request
from pathlib import Path

import pytest
from botocore.exceptions import BotoCoreError, ClientError

from app.config import get_settings
from app.storage import ArtifactStore, FileStore, store_from_url
from tests.service.conftest import make_bucket


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "file":
        return store_from_url(f"file://{tmp_path / 'store'}")
    env = request.getfixturevalue("s3_env")
    return store_from_url(f"s3://{make_bucket(env['AWS_ENDPOINT_URL'])}/some/prefix")


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_put_fetch_iter_delete_round_trip(store: ArtifactStore, tmp_path: Path) -> None:
    key = "artifacts/tenant-1/job-1/attempt-1.pt"
    data = os.urandom(300_000)
    assert not store.exists(key)
    store.put_file(key, write(tmp_path / "a.bin", data))
    assert store.exists(key)
    store.fetch_to(key, tmp_path / "fetched.bin")
    assert (tmp_path / "fetched.bin").read_bytes() == data
    chunks = list(store.iter_bytes(key, chunk_size=64 * 1024))
    assert b"".join(chunks) == data and max(len(c) for c in chunks) <= 64 * 1024
    # overwrite replaces the whole object
    store.put_file(key, write(tmp_path / "b.bin", b"second version"))
    assert b"".join(store.iter_bytes(key)) == b"second version"
    store.delete(key)
    assert not store.exists(key)
    store.delete(key)  # deleting twice is fine


def test_missing_objects_read_as_file_not_found(store: ArtifactStore, tmp_path: Path) -> None:
    assert not store.exists("models/nobody/nothing")
    with pytest.raises(FileNotFoundError):
        store.fetch_to("models/nobody/nothing", tmp_path / "out")
    with pytest.raises(FileNotFoundError):
        b"".join(store.iter_bytes("models/nobody/nothing"))


def test_failed_put_leaves_nothing_behind(store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(OSError):
        store.put_file("models/t/m", tmp_path / "does-not-exist")
    assert not store.exists("models/t/m")
    if isinstance(store, FileStore):
        assert not [p for p in store.root.rglob("*") if p.is_file()]


def test_large_file_multipart_and_streamed(
    request: pytest.FixtureRequest, store: ArtifactStore, tmp_path: Path
) -> None:
    size = 20 * 1024**2 + 12345
    data = os.urandom(size)
    source = write(tmp_path / "big.bin", data)
    if not isinstance(store, FileStore):
        from app.storage_s3 import S3Store

        assert isinstance(store, S3Store)
        store = S3Store(store.bucket, store.prefix, multipart_threshold=5 * 1024**2, multipart_chunksize=5 * 1024**2)
    store.put_file("artifacts/big", source)
    if not isinstance(store, FileStore):
        head = store._client.head_object(Bucket=store.bucket, Key=f"{store.prefix}/artifacts/big")
        assert head["ContentLength"] == size
        assert head["ETag"].strip('"').endswith("-5"), f"not a 5-part multipart upload: {head['ETag']}"
    store.fetch_to("artifacts/big", tmp_path / "big.out")
    assert sha((tmp_path / "big.out").read_bytes()) == sha(data)
    digest, largest = hashlib.sha256(), 0
    for chunk in store.iter_bytes("artifacts/big"):
        digest.update(chunk)
        largest = max(largest, len(chunk))
    assert digest.hexdigest() == sha(data)
    assert largest <= 1024 * 1024  # streamed in chunks, never read whole


@pytest.mark.parametrize("key", ["../outside", "a/../../outside", "/etc/passwd"])
def test_keys_cannot_escape_the_store(store: ArtifactStore, tmp_path: Path, key: str) -> None:
    source = write(tmp_path / "x", b"x")
    with pytest.raises(ValueError):
        store.put_file(key, source)
    with pytest.raises(ValueError):
        store.exists(key)
    if isinstance(store, FileStore):
        assert not (tmp_path / "outside").exists()


def test_check_passes_when_reachable(store: ArtifactStore) -> None:
    store.check()


def test_file_store_check_fails_when_not_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FileStore(tmp_path / "store")
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)  # root ignores permission bits
    with pytest.raises(OSError):
        store.check()


def test_s3_check_fails_on_a_missing_bucket_unless_asked_to_create(
    s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bucket = f"mp-new-{secrets.token_hex(4)}"
    with pytest.raises(ClientError):
        store_from_url(f"s3://{bucket}/p").check()
    monkeypatch.setenv("MODELPRESS_S3_CREATE_BUCKET", "true")
    get_settings.cache_clear()
    store = store_from_url(f"s3://{bucket}/p")
    store.check()
    store.put_file("k", write(tmp_path / "k", b"hello"))
    assert store.exists("k")


def test_s3_check_fails_when_the_endpoint_is_down(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    from app.storage_s3 import S3Store

    with pytest.raises(BotoCoreError):
        S3Store("anything", "p").check()


def test_s3_presigned_download_url(s3_env: dict[str, str], tmp_path: Path) -> None:
    from app.storage_s3 import S3Store

    store = S3Store(make_bucket(s3_env["AWS_ENDPOINT_URL"]), "prefix")
    store.put_file("artifacts/t/j/a.pt", write(tmp_path / "a", b"artifact bytes"))
    url = store.presigned_url("artifacts/t/j/a.pt", expires_s=60)
    assert url.startswith(s3_env["AWS_ENDPOINT_URL"]) and "Signature" in url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"artifact bytes"
