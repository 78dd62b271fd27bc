"""Shared fixtures: real Postgres and Redis (required in CI), settings wiring, model builders."""

from __future__ import annotations

import importlib.util
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
POSTGRES_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")

if importlib.util.find_spec("torchvision") is not None:
    # transformers imports torchvision by itself; PyPI's CUDA torchvision needs its ops declared on CPU torch first
    from worker.compression.torchvision_ops import declare_torchvision_ops

    declare_torchvision_ops()


def unavailable(what: str, error: Exception) -> None:
    """In CI a missing service is a failure, never a skip."""
    message = f"{what} is not reachable: {error}"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def reset_caches() -> None:
    """Settings, engines, stores and the Celery app are cached per process; tests rewire them."""
    from app.config import get_settings
    from app.db import get_engine, get_read_engine, get_read_session_factory, get_session_factory
    from app.queue import get_celery
    from app.storage import get_store

    for engine_cache in (get_engine, get_read_engine):
        if engine_cache.cache_info().currsize:
            engine_cache().dispose()
    for cached in (
        get_settings,
        get_engine,
        get_read_engine,
        get_session_factory,
        get_read_session_factory,
        get_store,
        get_celery,
    ):
        cached.cache_clear()
    from app.auth import verified_keys

    verified_keys.clear()


@pytest.fixture(scope="session")
def postgres_server() -> str:
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as error:
        unavailable("PostgreSQL", error)
    return POSTGRES_ADMIN_URL


@pytest.fixture(scope="session")
def make_postgres_database(postgres_server: str) -> Iterator:
    """Factory of fresh, empty Postgres databases; all dropped at the end of the session."""
    from sqlalchemy import create_engine, make_url, text

    admin = create_engine(postgres_server, isolation_level="AUTOCOMMIT")
    made: list[str] = []

    def make() -> str:
        name = f"modelpress_test_{secrets.token_hex(4)}"
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        made.append(name)
        return make_url(postgres_server).set(database=name).render_as_string(hide_password=False)

    yield make
    with admin.connect() as connection:
        for name in made:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def redis_server() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as error:
        unavailable("Redis", error)
    return REDIS_URL


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    """A Redis database number of its own, flushed before and after."""
    import redis

    index = 1 + secrets.randbelow(14)
    url = f"{redis_server}/{index}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()


@pytest.fixture
def service_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """Point MODELPRESS_* at the given URLs (defaults: embedded) and rewire the caches."""
    applied: dict[str, str] = {}

    def apply(**overrides: str) -> dict[str, str]:
        env = {
            "MODELPRESS_DATA_DIR": str(tmp_path / "data"),
            "MODELPRESS_RATE_LIMIT_PER_MINUTE": "100000",
            "MODELPRESS_RATE_LIMIT_INVALID_KEYS_PER_MINUTE": "100000",
        }
        env.update({f"MODELPRESS_{k.upper()}": v for k, v in overrides.items()})
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        applied.clear()
        applied.update(env)
        reset_caches()
        return env

    yield apply
    monkeypatch.undo()
    reset_caches()
