"""One settings class; every variable is MODELPRESS_<NAME>.

Defaults give the embedded mode (SQLite, a file-system broker, local files);
pointing the URLs at Postgres, Redis and S3 gives the production mode.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODELPRESS_", extra="ignore")

    data_dir: Path = Path("./var")
    database_url: str | None = None
    broker_url: str | None = None
    storage_url: str | None = None

    max_upload_bytes: int = 2 * 1024**3
    max_archive_unpacked_bytes: int = 16 * 1024**3
    max_queued_jobs_per_tenant: int = 100
    max_stored_bytes_per_tenant: int = 50 * 1024**3
    rate_limit_per_minute: int = 600
    # requests with a missing or unknown API key, per client address (limits key guessing)
    rate_limit_invalid_keys_per_minute: int = 30
    # where the rate limit keeps its counters so all API processes share them; default: the
    # broker URL when that is Redis, else an in-process limit
    redis_url: str | None = None
    # API keys found valid are remembered in each API process this long (0: look every request up); a revoked
    # key stops working at once in the revoking process and within this many seconds in the others
    api_key_cache_seconds: float = 5.0
    cors_origins: list[str] = Field(default_factory=list)
    # host names webhooks may reach even though they resolve to internal addresses
    # (comma-separated or a JSON list); every other loopback/private/link-local target is refused
    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # partial uploads in <data_dir>/incoming untouched for this long are removed (at start and hourly)
    incoming_max_age_s: float = 6 * 3600

    # artifacts of jobs finished longer ago than this are removed by `modelpress cleanup`
    artifact_retention_days: int | None = None

    # worker
    job_time_limit_s: int = 3600
    job_soft_time_limit_s: int = 3300
    lease_seconds: int = 120
    # a queued job nobody claimed for this long is published again (a broker may have lost it)
    requeue_queued_after_s: int = 300
    max_attempts: int = 3
    sandbox_memory_bytes: int = 16 * 1024**3
    sandbox_cpu_seconds: int = 7200
    sandbox_file_bytes: int = 8 * 1024**3
    sandbox_open_files: int = 256
    # "bubblewrap" (namespaces, no network, read-only environment; required in production) or "none"
    # (resource limits only: an explicit, development-only choice; the worker refuses to start otherwise
    # when bwrap is missing)
    sandbox_isolation: str = "bubblewrap"
    # each worker slot keeps one sandboxed child started ahead (torch imported, nothing loaded) for its next job
    warm_sandbox: bool = True
    # after inspection, each main scheme is tried on an upload whose inputs are known, so that a job of a
    # scheme that fails on it is refused at submit with the reason (worker/upload_trials.py); off, such jobs
    # run and fail in the worker with the same sentence
    upload_trials: bool = True
    # how long the worker keeps retrying its database writes (progress, events, the final result) through
    # an outage before giving the attempt up
    database_outage_tolerance_s: float = 300.0
    # scratch folders and partial uploads older than this, that no live process holds, are swept
    leftover_max_age_s: float = 3600.0
    worker_threads: int = 1
    worker_queues: str = "cpu"
    worker_stale_after_s: float = 30.0
    # 422 at submit when no live worker has the job's device; otherwise queue it with a warning
    require_live_worker: bool = False

    # object storage (s3:// storage URLs); credentials come from the standard AWS_* variables
    s3_endpoint_url: str | None = None
    s3_create_bucket: bool = False
    s3_addressing_style: str | None = None
    s3_multipart_threshold_bytes: int = 64 * 1024**2
    s3_multipart_chunk_bytes: int = 16 * 1024**2

    @field_validator("webhook_allowed_hosts", mode="before")
    @classmethod
    def _host_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @property
    def rate_limit_redis_url(self) -> str | None:
        if self.redis_url:
            return self.redis_url
        if self.broker_url and self.broker_url.startswith(("redis://", "rediss://")):
            return self.broker_url
        return None

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'modelpress.sqlite3').resolve()}"

    @property
    def is_embedded_broker(self) -> bool:
        return not self.broker_url

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_folder(self) -> Path:
        return (self.data_dir / "broker").resolve()

    @property
    def resolved_storage_url(self) -> str:
        return self.storage_url or f"file://{(self.data_dir / 'storage').resolve()}"

    @property
    def scratch_dir(self) -> Path:
        return (self.data_dir / "scratch").resolve()


@lru_cache
def get_settings() -> Settings:
    return Settings()
