"""Migrations are the only way the schema is made: upgrade, downgrade, upgrade again, on Postgres."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, inspect

import app.tables  # noqa: F401  (registers the tables on Base.metadata)
from app.db import Base
from app.migrate import downgrade, upgrade

pytestmark = pytest.mark.postgres


def table_names(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_on_postgres(make_postgres_database) -> None:  # type: ignore[no-untyped-def]
    url = make_postgres_database()
    expected = set(Base.metadata.tables)
    upgrade(url)
    assert table_names(url) == expected | {"alembic_version"}
    downgrade(url, "base")
    assert table_names(url) <= {"alembic_version"}
    upgrade(url)
    assert table_names(url) == expected | {"alembic_version"}


def test_models_and_migrations_agree(make_postgres_database) -> None:  # type: ignore[no-untyped-def]
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    url = make_postgres_database()
    upgrade(url)
    engine = create_engine(url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, Base.metadata)
    engine.dispose()
    assert differences == []
