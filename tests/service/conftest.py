"""API fixtures: a real Postgres built by `alembic upgrade head`, an in-process client per test."""
from __future__ import annotations

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
        tables = [r[0] for r in connection.execute(text(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename != 'alembic_version'"))]
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
