"""Limits that must hold across concurrent requests and API processes: the job quota, the rate limits."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.helpers import start_api_process, wait_for
from tests.service.conftest import Api
from tests.service.test_api import assert_error, counts, upload_ts

pytestmark = pytest.mark.postgres


def test_fifty_concurrent_submits_against_a_quota_of_ten_accept_exactly_ten(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.config import get_settings

    model = upload_ts(api)
    monkeypatch.setattr(get_settings(), "max_queued_jobs_per_tenant", 10)
    spec = {
        "model_id": model["id"],
        "stages": [{"method": "quantize", "scheme": "dynamic_int8"}],
        "example_input_shape": [1, 8],
    }
    with ThreadPoolExecutor(25) as pool:
        responses = list(pool.map(lambda _: api.client.post("/v1/jobs", headers=api.headers(), json=spec), range(50)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(202) == 10 and statuses.count(429) == 40, statuses
    assert all(r.json()["error"] == "QuotaExceeded" for r in responses if r.status_code == 429)
    assert counts()[2] == 10
    # the other tenant has its own quota
    other = upload_ts(api, api.other_key)
    spec_other = {**spec, "model_id": other["id"]}
    assert api.client.post("/v1/jobs", headers=api.headers(api.other_key), json=spec_other).status_code == 202


@pytest.fixture
def two_api_processes(
    make_postgres_database, redis_url, service_env, tmp_path: Path
) -> Iterator[tuple[list[str], str]]:  # type: ignore[no-untyped-def]
    """Two uvicorn processes on one Postgres and one Redis; yields their URLs and an API key."""
    from app.auth import create_key
    from app.db import session_scope
    from app.migrate import upgrade

    database_url = make_postgres_database()
    upgrade(database_url)
    env = service_env(
        database_url=database_url,
        broker_url=redis_url,
        rate_limit_per_minute="6",
        rate_limit_invalid_keys_per_minute="4",
    )
    with session_scope() as session:
        _, key = create_key(session, tenant_name="limited")
    process_env = dict(os.environ, **env)
    servers, urls = [], []
    try:
        for number in range(2):
            server, url = start_api_process(process_env, tmp_path / f"api{number}.log")
            servers.append(server)
            urls.append(url)
        for server, url in zip(servers, urls):

            def healthy(server: subprocess.Popen = server, url: str = url) -> bool:
                assert server.poll() is None, (tmp_path / "api0.log").read_text() + (tmp_path / "api1.log").read_text()
                try:
                    return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
                except httpx.TransportError:
                    return False

            wait_for(healthy, 60, "an API process to start")
        yield urls, key
    finally:
        for server in servers:
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(5)


@pytest.mark.redis
def test_rate_limits_are_shared_by_api_processes_through_redis(two_api_processes: tuple[list[str], str]) -> None:
    (first, second), key = two_api_processes
    headers = {"Authorization": f"Bearer {key}"}
    # 6 a minute for the tenant, counted across both processes: 3 + 3 pass, the 7th (either process) does not
    statuses = [
        httpx.get(f"{url}/v1/jobs", headers=headers, timeout=10).status_code
        for url in (first, second, first, second, first, second)
    ]
    assert statuses == [200] * 6
    limited = httpx.get(f"{second}/v1/jobs", headers=headers, timeout=10)
    assert_error(limited, 429, "RateLimited")
    assert int(limited.headers["Retry-After"]) >= 1
    assert httpx.get(f"{first}/v1/jobs", headers=headers, timeout=10).status_code == 429

    # bad keys: 4 a minute per client address, across both processes; then 429 before any key lookup
    bad = {"Authorization": "Bearer mpk_guessed"}
    guesses = [
        httpx.get(f"{url}/v1/models", headers=bad, timeout=10).status_code for url in (first, second, first, second)
    ]
    assert guesses == [401] * 4
    for url in (first, second):
        refused = httpx.get(f"{url}/v1/models", headers=bad, timeout=10)
        assert_error(refused, 429, "RateLimited")
        assert int(refused.headers["Retry-After"]) >= 1
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 429  # no key at all counts the same


def test_bad_keys_are_throttled_per_address_without_redis(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    from app import ratelimit
    from app.config import get_settings

    monkeypatch.setattr(get_settings(), "rate_limit_invalid_keys_per_minute", 3)
    ratelimit._buckets.clear()
    bad = {"Authorization": "Bearer mpk_guessed"}
    statuses = [api.client.get("/v1/models", headers=bad).status_code for _ in range(5)]
    assert statuses == [401, 401, 401, 429, 429]
    # a good key does not count against the budget, but it waits out the window from that address
    assert api.client.get("/v1/models", headers=api.headers()).status_code == 429
    ratelimit._buckets.clear()
    assert api.client.get("/v1/models", headers=api.headers()).status_code == 200
