"""S3-compatible object storage (AWS S3, MinIO, Ceph RGW, moto), chosen by MODELPRESS_STORAGE_URL=s3://bucket/prefix.

Endpoint, region and credentials come from the standard AWS chain: AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3),
AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profiles, instance roles. A few knobs of our own:

  MODELPRESS_S3_ENDPOINT_URL        overrides the endpoint for this store only
  MODELPRESS_S3_ADDRESSING_STYLE    path | virtual | auto (default: path with a custom endpoint, else auto)
  MODELPRESS_S3_CREATE_BUCKET       true: create the bucket when it is missing (dev/MinIO); default false
  MODELPRESS_S3_MULTIPART_THRESHOLD_BYTES / MODELPRESS_S3_MULTIPART_CHUNK_BYTES  (defaults 64 MiB / 16 MiB)

A PUT (single or completed multipart) is all or nothing, so readers never see a half-written object.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

from app.config import get_settings

CHUNK = 1024 * 1024
MISSING_CODES = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}


def _error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


class S3Store:
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        create_bucket: bool | None = None,
        multipart_threshold: int | None = None,
        multipart_chunksize: int | None = None,
    ) -> None:
        if not bucket:
            raise ValueError("an s3:// storage URL needs a bucket: s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        settings = get_settings()
        self.endpoint_url = endpoint_url or settings.s3_endpoint_url or None
        self.create_bucket = settings.s3_create_bucket if create_bucket is None else create_bucket
        self.addressing_style = settings.s3_addressing_style
        threshold = multipart_threshold or settings.s3_multipart_threshold_bytes
        chunk = multipart_chunksize or settings.s3_multipart_chunk_bytes
        # S3 parts are at least 5 MiB (except the last one)
        self.transfer = TransferConfig(
            multipart_threshold=threshold, multipart_chunksize=max(chunk, 5 * 1024**2), max_concurrency=4
        )
        self._lock = threading.Lock()
        self._client_pid: int | None = None
        self._client_obj: Any = None
        self._bucket_ready = False

    # --- plumbing -------------------------------------------------------------------------------------

    @property
    def _client(self) -> Any:
        # one client per process: Celery's prefork children must not share the parent's connection pool
        if self._client_pid != os.getpid():
            with self._lock:
                if self._client_pid != os.getpid():
                    custom_endpoint = bool(
                        self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                    )
                    style = self.addressing_style or ("path" if custom_endpoint else "auto")
                    # retries follow the standard AWS_MAX_ATTEMPTS / AWS_RETRY_MODE variables
                    config = Config(s3={"addressing_style": style}, connect_timeout=10, read_timeout=60)
                    self._client_obj = boto3.session.Session().client(
                        "s3", endpoint_url=self.endpoint_url, config=config
                    )
                    self._client_pid = os.getpid()
        return self._client_obj

    def _key(self, key: str) -> str:
        parts = key.split("/")
        if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"storage key escapes the store or is malformed: {key!r}")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _ensure_bucket(self) -> None:
        if self._bucket_ready or not self.create_bucket:
            return
        client = self._client
        try:
            client.head_bucket(Bucket=self.bucket)
        except ClientError as error:
            if _error_code(error) not in MISSING_CODES:
                raise
            region = client.meta.region_name
            kwargs: dict[str, Any] = {"Bucket": self.bucket}
            if region and region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
            try:
                client.create_bucket(**kwargs)
            except ClientError as create_error:
                if _error_code(create_error) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
        self._bucket_ready = True

    def _missing(self, error: ClientError, key: str) -> Exception:
        if _error_code(error) in MISSING_CODES:
            return FileNotFoundError(f"no object {key!r} in s3://{self.bucket}/{self.prefix}")
        return error

    # --- ArtifactStore --------------------------------------------------------------------------------

    def put_file(self, key: str, source: Path) -> None:
        full = self._key(key)
        self._ensure_bucket()
        # upload_file switches to multipart above the threshold; the object appears only when complete
        self._client.upload_file(str(source), self.bucket, full, Config=self.transfer)

    def fetch_to(self, key: str, destination: Path) -> None:
        full = self._key(key)
        try:
            # download_file writes a temporary file beside the destination and renames it when complete
            self._client.download_file(self.bucket, full, str(destination), Config=self.transfer)
        except ClientError as error:
            raise self._missing(error, key) from error

    def iter_bytes(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        full = self._key(key)
        try:
            body = self._client.get_object(Bucket=self.bucket, Key=full)["Body"]
        except ClientError as error:
            raise self._missing(error, key) from error
        try:
            yield from body.iter_chunks(chunk_size)
        finally:
            body.close()

    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as error:
            if _error_code(error) not in MISSING_CODES:
                raise

    def exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as error:
            if _error_code(error) in MISSING_CODES:
                return False
            raise

    def check(self) -> None:
        self._ensure_bucket()
        self._client.head_bucket(Bucket=self.bucket)

    # --- extras ---------------------------------------------------------------------------------------

    def presigned_url(self, key: str, expires_s: int = 3600) -> str:
        """A time-limited GET URL, so large downloads can bypass the API process."""
        return self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=int(expires_s)
        )

    def __repr__(self) -> str:
        return f"S3Store(bucket={self.bucket!r}, prefix={self.prefix!r})"
