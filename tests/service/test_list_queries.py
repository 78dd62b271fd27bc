"""A page of jobs costs the same few SQL statements whatever its size (no query per job for its metrics or
artifact), counted with SQLAlchemy's before_cursor_execute event on a real database."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event
from sqlalchemy.engine import Engine

from app.job_states import JobStatus

Counter = Callable[[str], int]


def _seed(jobs: int) -> str:
    """A tenant with `jobs` finished jobs, each with its metrics and artifact; returns the tenant's API key."""
    from app.auth import create_key
    from app.db import session_scope
    from app.tables import Artifact, Job, JobMetrics, StoredModel

    with session_scope() as session:
        record, key = create_key(session, tenant_name="lister")
        model = StoredModel(
            tenant_id=record.tenant_id, name="m", format="pt2", size_bytes=1, sha256="0", storage_key="k"
        )
        session.add(model)
        session.flush()
        for number in range(jobs):
            job = Job(
                tenant_id=record.tenant_id,
                model_id=model.id,
                method="prune",
                status=JobStatus.SUCCEEDED,
                spec={"stages": [{"method": "prune", "scheme": "magnitude", "amount": 0.5}]},
            )
            session.add(job)
            session.flush()
            document = {"compression_ratio": 2.0 + number, "compressed": {"size_bytes": 100}}
            session.add(
                JobMetrics(
                    job_id=job.id,
                    original_size_bytes=200,
                    compressed_size_bytes=100,
                    compression_ratio=2.0 + number,
                    device="cpu",
                    document=document,
                )
            )
            session.add(
                Artifact(
                    job_id=job.id,
                    tenant_id=record.tenant_id,
                    storage_key=f"a/{job.id}",
                    size_bytes=100,
                    sha256=f"{number:064d}",
                    format="state_dict",
                    requires=[],
                )
            )
    return key


@pytest.fixture
def count_statements() -> Iterator[Callable[[Callable[[], object]], int]]:
    statements: list[str] = []

    def record(_conn, _cursor, statement, _parameters, _context, _executemany) -> None:  # type: ignore[no-untyped-def]
        statements.append(statement)

    def count(action: Callable[[], object]) -> int:
        statements.clear()
        action()
        return len([s for s in statements if s.lstrip().upper().startswith(("SELECT", "WITH"))])

    event.listen(Engine, "before_cursor_execute", record)
    yield count
    event.remove(Engine, "before_cursor_execute", record)


def _page_costs(count_statements: Callable[[Callable[[], object]], int]) -> tuple[int, int]:
    from app.main import create_app

    key = _seed(50)
    headers = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app()) as client:
        client.get("/v1/jobs?limit=1", headers=headers)  # the key is verified once and cached, as in service
        pages: dict[int, dict] = {}

        def page(limit: int) -> Callable[[], object]:
            def get() -> None:
                response = client.get(f"/v1/jobs?limit={limit}", headers=headers)
                assert response.status_code == 200
                pages[limit] = response.json()

            return get

        big, small = count_statements(page(50)), count_statements(page(5))
    # the pages hold what was seeded, metrics and artifact included (the count is of a real answer)
    assert len(pages[50]["items"]) == 50 and len(pages[5]["items"]) == 5
    assert all(item["metrics"] and item["artifact"] for item in pages[50]["items"])
    assert sorted(item["metrics"]["compression_ratio"] for item in pages[50]["items"]) == [2.0 + n for n in range(50)]
    return big, small


def test_a_page_of_50_jobs_costs_what_a_page_of_5_does(service_env, count_statements) -> None:  # type: ignore[no-untyped-def]
    from app.migrate import upgrade

    service_env()  # embedded: SQLite in the test's data folder
    upgrade()
    big, small = _page_costs(count_statements)
    assert big == small
    assert 1 <= big <= 3


@pytest.mark.postgres
def test_the_same_on_postgres(service_env, migrated_postgres: str, count_statements) -> None:  # type: ignore[no-untyped-def]
    service_env(database_url=migrated_postgres)
    try:
        big, small = _page_costs(count_statements)
    finally:
        from tests.service.conftest import _truncate

        _truncate(migrated_postgres)
    assert big == small
    assert 1 <= big <= 3
