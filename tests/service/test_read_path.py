"""The polled reads (GET /v1/jobs/{id}, GET /v1/jobs): their lean query answers what the ORM read model
answers, and a key revoked by another API process stops working within the key cache's lifetime."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select, update

from app.auth import hash_key
from app.db import session_scope
from tests.service.conftest import Api
from tests.service.test_api import assert_error, upload_ts

pytestmark = pytest.mark.postgres


def _finish_with_metrics_and_artifact(job_id: str) -> None:
    """What the worker's finish writes, written directly: the job succeeded with metrics and an artifact."""
    from app.tables import Artifact, Job, JobMetrics, utcnow

    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.status, job.progress, job.stage, job.attempt = "succeeded", 1.0, "done", 1
        job.started_at = job.finished_at = utcnow()
        document = {"compression_ratio": 2.5, "speed": {"verdict": "no measurable change"}, "warnings": ["x"]}
        session.add(
            JobMetrics(
                job_id=job.id,
                original_size_bytes=1000,
                compressed_size_bytes=400,
                compression_ratio=2.5,
                device="cpu",
                document=document,
            )
        )
        session.add(
            Artifact(
                job_id=job.id,
                tenant_id=job.tenant_id,
                storage_key="k",
                size_bytes=400,
                sha256="a" * 64,
                format="torchscript",
                requires=["torch>=2.6"],
            )
        )


def test_job_reads_answer_what_the_orm_read_model_answers(api: Api) -> None:
    from app import jobs as service
    from app.tables import Job

    model = upload_ts(api)
    spec = {
        "model_id": model["id"],
        "stages": [{"method": "quantize", "scheme": "dynamic_int8"}],
        "example_input_shape": [1, 8],
    }
    ids = [api.client.post("/v1/jobs", headers=api.headers(), json=spec).json()["id"] for _ in range(3)]
    _finish_with_metrics_and_artifact(ids[1])
    with session_scope() as session:
        expected = {
            job.id: service.job_read(session, job).model_dump(mode="json")
            for job in session.scalars(select(Job).where(Job.id.in_(ids)))
        }
    assert expected[ids[1]]["artifact"] is not None and expected[ids[1]]["metrics"] is not None
    for job_id in ids:
        response = api.client.get(f"/v1/jobs/{job_id}", headers=api.headers())
        assert response.status_code == 200 and response.json() == expected[job_id]
    page = api.client.get("/v1/jobs", headers=api.headers(), params={"limit": 2}).json()
    assert page["items"] == [expected[ids[2]], expected[ids[1]]]
    rest = api.client.get("/v1/jobs", headers=api.headers(), params={"cursor": page["next_cursor"]}).json()
    assert rest == {"items": [expected[ids[0]]], "next_cursor": None}
    succeeded = api.client.get("/v1/jobs", headers=api.headers(), params={"status": "succeeded"}).json()
    assert [job["id"] for job in succeeded["items"]] == [ids[1]]
    # another tenant's job is as absent as a missing one, in the list and by id
    assert_error(api.client.get(f"/v1/jobs/{ids[0]}", headers=api.headers(api.other_key)), 404)
    assert api.client.get("/v1/jobs", headers=api.headers(api.other_key)).json()["items"] == []


def test_a_key_revoked_by_another_process_stops_working_within_the_cache_lifetime(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.config import get_settings
    from app.tables import ApiKey, utcnow

    ttl_s = 1.0
    monkeypatch.setattr(get_settings(), "api_key_cache_seconds", ttl_s)
    assert api.client.get("/v1/jobs", headers=api.headers()).status_code == 200  # verified and cached here
    # revoked as another API process would: in the database only, so this process's cache is not told
    with session_scope() as session:
        session.execute(update(ApiKey).where(ApiKey.key_hash == hash_key(api.key)).values(revoked_at=utcnow()))
    revoked_at = time.monotonic()
    while api.client.get("/v1/jobs", headers=api.headers()).status_code == 200:
        assert time.monotonic() - revoked_at < ttl_s + 1.0, "the revoked key outlived the cache lifetime"
        time.sleep(0.05)
    assert_error(api.client.get("/v1/jobs", headers=api.headers()), 401)
    assert api.client.get("/v1/jobs", headers=api.headers(api.other_key)).status_code == 200
