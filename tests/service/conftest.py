"""API fixtures: a real Postgres built by `alembic upgrade head`, an in-process client per test."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text


@pytest.fixture(scope="module")
def migrated_postgres(make_postgres_database) -> str:  # type: ignore[no-untyped-def]
    from app.migrate import upgrade

    url = make_postgres_database()
    upgrade(url)
    return url


@dataclass
class Api:
    client: TestClient
    key: str
    other_key: str
    database_url: str

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}


def _truncate(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as connection:
        tables = [
            r[0]
            for r in connection.execute(
                text("SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename != 'alembic_version'")
            )
        ]
        connection.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture
def api(migrated_postgres: str, service_env) -> Iterator[Api]:  # type: ignore[no-untyped-def]
    service_env(database_url=migrated_postgres)
    from app.auth import create_key
    from app.db import session_scope
    from app.main import create_app

    with session_scope() as session:
        _, key = create_key(session, tenant_name="alpha")
        _, other = create_key(session, tenant_name="beta")
    try:
        with TestClient(create_app()) as client:
            yield Api(client, key, other, migrated_postgres)
    finally:
        _truncate(migrated_postgres)


# ---------------------------------------------------------------- S3 (moto server on loopback)

AWS_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
CLEARED_AWS_ENV = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "MODELPRESS_S3_ENDPOINT_URL",
    "MODELPRESS_S3_CREATE_BUCKET",
    "MODELPRESS_S3_ADDRESSING_STYLE",
)


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A real S3 HTTP API (moto's server mode) on a free loopback port, for this test session."""
    pytest.importorskip("moto.server", reason="moto[server] is a test dependency")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Standard AWS variables pointing at moto; returns them (for worker subprocesses)."""
    for name in CLEARED_AWS_ENV:
        monkeypatch.delenv(name, raising=False)
    env = dict(AWS_TEST_ENV, AWS_ENDPOINT_URL=moto_endpoint)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def make_bucket(endpoint: str) -> str:
    import boto3

    name = f"mp-test-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=endpoint, **_credentials()).create_bucket(Bucket=name)
    return name


def _credentials() -> dict[str, str]:
    return {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
