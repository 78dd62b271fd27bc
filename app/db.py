"""Engine, session factory and the declarative base (with a naming convention for Alembic)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from sqlalchemy import MetaData, create_engine, event, make_url
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from app.config import get_settings

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def normalise_url(url: str) -> str:
    # psycopg 3 is the driver; accept the plain postgresql:// spelling too.
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://") :]
    if url.startswith("postgres://"):
        return "postgresql+psycopg://" + url[len("postgres://") :]
    return url


def make_engine(url: str, *, read_only: bool = False) -> Engine:
    """An engine for `url`; on SQLite, `read_only` engines begin deferred transactions that take no write lock."""
    url = normalise_url(url)
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=20, max_overflow=40
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            # WAL lets the API read while the worker writes; foreign keys are off by default in SQLite.
            # let SQLAlchemy drive transactions (pysqlite's own handling breaks SAVEPOINT)
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection) -> None:  # type: ignore[no-untyped-def]
            # Writers take the write lock up front (IMMEDIATE), so they queue instead of failing on a
            # lock upgrade; readers begin deferred and, with WAL, never wait for a writer.
            connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    # No pre-ping round trip on every checkout; connections are recycled instead, and a dead
    # one surfaces as OperationalError, which the API answers with 503 + Retry-After.
    return create_engine(url, pool_size=10, max_overflow=20, pool_recycle=300)


@lru_cache
def get_engine() -> Engine:
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return make_engine(settings.resolved_database_url)


@lru_cache
def get_read_engine() -> Engine:
    settings = get_settings()
    if not settings.resolved_database_url.startswith("sqlite"):
        # the same pool, in autocommit: a GET costs its SELECTs and no BEGIN / COMMIT round trips
        return get_engine().execution_options(isolation_level="AUTOCOMMIT")
    return make_engine(settings.resolved_database_url, read_only=True)


@lru_cache
def get_session_factory() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


@lru_cache
def get_read_session_factory() -> sessionmaker[Session]:
    """Sessions for requests that only read (GET): no write lock on SQLite."""
    return sessionmaker(bind=get_read_engine(), expire_on_commit=False)


@contextmanager
def session_scope(*, read_only: bool = False) -> Iterator[Session]:
    """A unit of work that commits on success and rolls back on error."""
    session = (get_read_session_factory() if read_only else get_session_factory())()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
