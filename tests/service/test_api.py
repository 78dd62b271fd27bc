"""The v1 API against a real Postgres: contract shapes, clear 4xx, nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from sqlalchemy import func, select

from app.auth import hash_key
from app.db import session_scope
from app.tables import Job, OutboxMessage, StoredDataset, StoredModel
from tests.helpers import PROJECT_ROOT, mlp, npz_bytes, torchscript_bytes
from tests.service.conftest import Api

pytestmark = pytest.mark.postgres


def upload_ts(api: Api, key: str | None = None) -> dict:
    response = api.client.post(
        "/v1/models", headers=api.headers(key), files={"file": ("mlp.pt", torchscript_bytes(mlp((8, 16, 4))))}
    )
    assert response.status_code == 201, response.text
    return response.json()


def counts() -> tuple[int, int, int]:
    with session_scope() as session:
        return (
            session.scalar(select(func.count()).select_from(StoredModel)) or 0,
            session.scalar(select(func.count()).select_from(StoredDataset)) or 0,
            session.scalar(select(func.count()).select_from(Job)) or 0,
        )


def stored_files(api: Api) -> list[str]:
    from app.config import get_settings

    root = get_settings().data_dir / "storage"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def assert_error(response, status: int, name: str | None = None) -> dict:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"error", "detail"} and body["detail"], body
    if name:
        assert body["error"] == name
    return body


def test_every_request_needs_a_valid_key(api: Api) -> None:
    assert_error(api.client.get("/v1/jobs"), 401, "Unauthorized")
    assert_error(api.client.get("/v1/jobs", headers={"Authorization": "Bearer mpk_wrong"}), 401)
    assert api.client.get("/v1/jobs", headers=api.headers()).status_code == 200
    assert api.client.get("/healthz").status_code == 200


def test_revoked_key_is_refused(api: Api) -> None:
    from app.auth import revoke_key
    from app.tables import ApiKey

    with session_scope() as session:
        key_id = session.scalars(select(ApiKey.id)).first()
        assert revoke_key(session, key_id)
        remaining = [k for k in session.scalars(select(ApiKey)) if k.revoked_at is None]
    statuses = {api.client.get("/v1/jobs", headers=api.headers(k)).status_code for k in (api.key, api.other_key)}
    assert 401 in statuses and len(remaining) == 1


def test_a_key_verified_a_moment_ago_is_refused_once_revoked(api: Api) -> None:
    """Verified keys are cached briefly in the process; revoking one forgets it at once."""
    from app.auth import revoke_key, verified_keys
    from app.tables import ApiKey

    assert api.client.get("/v1/jobs", headers=api.headers()).status_code == 200
    assert api.client.get("/v1/jobs", headers=api.headers()).status_code == 200  # served from the cache
    assert verified_keys.items
    with session_scope() as session:
        key_id = session.scalar(select(ApiKey.id).where(ApiKey.key_hash == hash_key(api.key)))
        assert revoke_key(session, key_id)
    assert_error(api.client.get("/v1/jobs", headers=api.headers()), 401)
    assert api.client.get("/v1/jobs", headers=api.headers(api.other_key)).status_code == 200


def test_keys_are_long_prefixed_and_stored_hashed(api: Api) -> None:
    from app.tables import ApiKey

    assert api.key.startswith("mpk_") and len(api.key) >= 4 + 43  # 32 random bytes, base64url
    with session_scope() as session:
        hashes = list(session.scalars(select(ApiKey.key_hash)))
    assert api.key not in hashes and all(len(h) == 64 for h in hashes)


def test_garbage_upload_is_refused_and_leaves_nothing(api: Api) -> None:
    response = api.client.post("/v1/models", headers=api.headers(), files={"file": ("x.pt", b"not a model at all")})
    assert_error(response, 422, "InvalidRequest")
    assert counts() == (0, 0, 0)
    assert stored_files(api) == []


def test_weight_only_upload_needs_a_known_architecture(api: Api) -> None:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(mlp((8, 16, 4)).state_dict(), buffer)
    blob = buffer.getvalue()
    assert_error(api.client.post("/v1/models", headers=api.headers(), files={"file": ("w.pt", blob)}), 422)
    bad = api.client.post(
        "/v1/models",
        headers=api.headers(),
        files={"file": ("w.pt", blob)},
        data={"architecture": json.dumps({"name": "os.system"})},
    )
    assert "unknown architecture" in assert_error(bad, 422)["detail"]
    assert counts() == (0, 0, 0) and stored_files(api) == []
    good = api.client.post(
        "/v1/models",
        headers=api.headers(),
        files={"file": ("w.pt", blob)},
        data={"architecture": json.dumps({"name": "mlp", "kwargs": {"widths": [8, 16, 4]}})},
    )
    assert good.status_code == 201 and good.json()["format"] == "state_dict"


def test_model_upload_read_list_and_tenant_isolation(api: Api) -> None:
    model = upload_ts(api)
    assert model["format"] == "torchscript" and model["status"] == "pending" and len(model["sha256"]) == 64
    assert api.client.get(f"/v1/models/{model['id']}", headers=api.headers()).json()["id"] == model["id"]
    assert [m["id"] for m in api.client.get("/v1/models", headers=api.headers()).json()["items"]] == [model["id"]]
    assert_error(api.client.get(f"/v1/models/{model['id']}", headers=api.headers(api.other_key)), 404, "NotFound")
    assert api.client.get("/v1/models", headers=api.headers(api.other_key)).json()["items"] == []
    spec = {
        "model_id": model["id"],
        "stages": [{"method": "quantize", "scheme": "dynamic_int8"}],
        "example_input_shape": [1, 8],
    }
    assert_error(api.client.post("/v1/jobs", headers=api.headers(api.other_key), json=spec), 404)
    download = api.client.get(f"/v1/models/{model['id']}/download", headers=api.headers())
    assert download.status_code == 200 and len(download.content) == model["size_bytes"]


@pytest.mark.parametrize(
    ("stage", "fragment"),
    [
        ({"method": "shrink"}, "unknown method"),
        ({"method": "quantize", "scheme": "no_such_scheme"}, "unknown scheme"),
        ({"method": "prune", "scheme": "l1_unstructured", "amount": 1.5}, "amount"),
        ({"method": "prune", "scheme": "l1_unstructured", "amount": "lots"}, "amount"),
        ({"method": "prune", "scheme": "l1_unstructured", "colour": "red"}, "unknown option"),
        ({"method": "quantize", "scheme": "static_int8"}, "dataset"),
        ({"method": "quantize", "scheme": "float8"}, "cpu"),
        ({"method": "prune", "scheme": "nm_semi_structured", "n": 4, "m": 4}, "n must be smaller"),
    ],
)
def test_jobs_that_cannot_run_answer_422_at_submit(api: Api, stage: dict, fragment: str) -> None:
    model = upload_ts(api)
    response = api.client.post(
        "/v1/jobs",
        headers=api.headers(),
        json={"model_id": model["id"], "stages": [stage], "example_input_shape": [1, 8]},
    )
    assert fragment in assert_error(response, 422)["detail"]
    assert counts()[2] == 0


def test_quantize_then_prune_is_refused(api: Api) -> None:
    model = upload_ts(api)
    response = api.client.post(
        "/v1/jobs",
        headers=api.headers(),
        json={
            "model_id": model["id"],
            "example_input_shape": [1, 8],
            "stages": [
                {"method": "quantize", "scheme": "dynamic_int8"},
                {"method": "prune", "scheme": "l1_unstructured", "amount": 0.5},
            ],
        },
    )
    assert "float weights" in assert_error(response, 422)["detail"]


def test_input_shape_is_required_without_a_dataset(api: Api) -> None:
    model = upload_ts(api)
    response = api.client.post(
        "/v1/jobs",
        headers=api.headers(),
        json={"model_id": model["id"], "stages": [{"method": "quantize", "scheme": "dynamic_int8"}]},
    )
    assert "example_input_shape" in assert_error(response, 422)["detail"]


def test_job_lifecycle_listing_paging_and_cancel(api: Api) -> None:
    model = upload_ts(api)
    spec = {
        "model_id": model["id"],
        "stages": [{"method": "quantize", "scheme": "dynamic_int8"}],
        "example_input_shape": [1, 8],
    }
    ids = []
    for _ in range(5):
        response = api.client.post("/v1/jobs", headers=api.headers(), json=spec)
        assert response.status_code == 202
        job = response.json()
        assert job["status"] == "queued" and job["metrics"] is None and job["artifact"] is None
        ids.append(job["id"])
    with session_scope() as session:
        published = session.scalars(select(OutboxMessage).where(OutboxMessage.task == "modelpress.run_job")).all()
    assert len(published) == 5 and all(m.published_at is not None for m in published)

    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = api.client.get("/v1/jobs", headers=api.headers(), params=params).json()
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == list(reversed(ids))
    assert len(api.client.get("/v1/jobs", headers=api.headers(), params={"method": "prune"}).json()["items"]) == 0
    assert (
        len(
            api.client.get(
                "/v1/jobs", headers=api.headers(), params={"model_id": model["id"], "status": "queued"}
            ).json()["items"]
        )
        == 5
    )

    cancelled = api.client.post(f"/v1/jobs/{ids[0]}/cancel", headers=api.headers())
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert_error(api.client.post(f"/v1/jobs/{ids[0]}/cancel", headers=api.headers()), 409, "Conflict")
    assert_error(api.client.get(f"/v1/jobs/{ids[1]}/artifact", headers=api.headers()), 409)
    assert_error(api.client.get("/v1/jobs", headers=api.headers(), params={"cursor": "!!"}), 422)


def test_idempotency_key_replays_and_rejects_other_bodies(api: Api) -> None:
    model = upload_ts(api)
    spec = {
        "model_id": model["id"],
        "stages": [{"method": "quantize", "scheme": "dynamic_int8"}],
        "example_input_shape": [1, 8],
    }
    headers = {**api.headers(), "Idempotency-Key": "retrain-42"}
    first = api.client.post("/v1/jobs", headers=headers, json=spec)
    second = api.client.post("/v1/jobs", headers=headers, json=spec)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    other = api.client.post("/v1/jobs", headers=headers, json={**spec, "example_input_shape": [2, 8]})
    assert_error(other, 422)
    assert counts()[2] == 1


def test_queued_job_quota(api: Api, service_env, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from app.config import get_settings

    model = upload_ts(api)
    monkeypatch.setattr(get_settings(), "max_queued_jobs_per_tenant", 2)
    spec = {
        "model_id": model["id"],
        "stages": [{"method": "quantize", "scheme": "dynamic_int8"}],
        "example_input_shape": [1, 8],
    }
    assert [api.client.post("/v1/jobs", headers=api.headers(), json=spec).status_code for _ in range(2)] == [202, 202]
    refused = api.client.post("/v1/jobs", headers=api.headers(), json=spec)
    assert_error(refused, 429, "QuotaExceeded")
    assert refused.headers.get("Retry-After")


def test_rate_limit_answers_429_with_retry_after(api: Api, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from app import ratelimit
    from app.config import get_settings

    monkeypatch.setattr(get_settings(), "rate_limit_per_minute", 3)
    ratelimit._buckets.clear()
    statuses = [api.client.get("/v1/jobs", headers=api.headers()).status_code for _ in range(5)]
    assert statuses[:3] == [200, 200, 200] and statuses[-1] == 429
    limited = api.client.get("/v1/jobs", headers=api.headers())
    assert int(limited.headers["Retry-After"]) >= 1


def test_datasets_upload_and_pickle_refusal(api: Api) -> None:
    good = api.client.post(
        "/v1/datasets",
        headers=api.headers(),
        files={"file": ("d.npz", npz_bytes(np.zeros((4, 8), np.float32), np.arange(4)))},
    )
    assert good.status_code == 201 and good.json()["info"]["arrays"] == ["inputs", "labels"]
    import io

    buffer = io.BytesIO()
    np.savez(buffer, inputs=np.array([{"evil": 1}], dtype=object))
    bad = api.client.post("/v1/datasets", headers=api.headers(), files={"file": ("d.npz", buffer.getvalue())})
    assert "pickle" in assert_error(bad, 422)["detail"]
    # arrays named like a model's inputs are fine (named-input datasets); labels alone are not
    no_inputs = api.client.post(
        "/v1/datasets",
        headers=api.headers(),
        files={"file": ("d.npz", npz_bytes(np.zeros(3)).replace(b"inputs", b"labels"))},
    )
    assert no_inputs.status_code == 422
    assert counts()[1] == 1


def test_upload_cap_answers_413_with_or_without_content_length(api: Api, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from app.config import get_settings

    monkeypatch.setattr(get_settings(), "max_upload_bytes", 4096)
    big = b"PK" + b"\0" * 200_000
    assert_error(api.client.post("/v1/models", headers=api.headers(), files={"file": ("big.pt", big)}), 413)

    def chunks():  # type: ignore[no-untyped-def]
        boundary = b'--x\r\nContent-Disposition: form-data; name="file"; filename="b.pt"\r\n\r\n'
        yield boundary
        for _ in range(50):
            yield b"\0" * 8192
        yield b"\r\n--x--\r\n"

    streamed = api.client.post(
        "/v1/models", headers={**api.headers(), "Content-Type": "multipart/form-data; boundary=x"}, content=chunks()
    )
    assert_error(streamed, 413)
    assert counts() == (0, 0, 0)


def test_methods_catalogue_lists_schemes_devices_and_presets(api: Api) -> None:
    catalogue = api.client.get("/v1/methods", headers=api.headers()).json()
    schemes = {(m["method"], s["name"]): s for m in catalogue["methods"] for s in m["schemes"]}
    assert schemes[("quantize", "dynamic_int8")]["devices"] == ["cpu"]
    assert "cuda" in schemes[("quantize", "float8")]["devices"]
    amount = next(o for o in schemes[("prune", "l1_unstructured")]["options"] if o["name"] == "amount")
    assert amount["minimum"] == 0.0 and amount["maximum"] == 1.0 and amount["maximum_exclusive"]
    assert {"cpu-int8", "deep-compression", "distill-small"} <= {p["name"] for p in catalogue["presets"]}


def test_readyz_reports_each_dependency(api: Api) -> None:
    body = api.client.get("/readyz").json()
    assert body["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}


def test_openapi_documents_errors(api: Api) -> None:
    schema = api.client.get("/openapi.json").json()
    submit = schema["paths"]["/v1/jobs"]["post"]
    assert submit["summary"] and {"401", "404", "422", "429"} <= set(submit["responses"])
    assert api.client.get("/docs").status_code == 200


def test_api_process_never_imports_torch() -> None:
    code = "import sys, app.main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_concurrent_posts_with_one_idempotency_key_make_one_job(api: Api) -> None:
    from concurrent.futures import ThreadPoolExecutor

    model = upload_ts(api)
    spec = {
        "model_id": model["id"],
        "stages": [{"method": "quantize", "scheme": "dynamic_int8"}],
        "example_input_shape": [1, 8],
    }
    headers = {**api.headers(), "Idempotency-Key": "burst-1"}
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda _: api.client.post("/v1/jobs", headers=headers, json=spec), range(50)))
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["id"] for r in responses}) == 1
    assert counts()[2] == 1


def test_database_down_answers_503_with_retry_after(service_env) -> None:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from app.main import create_app

    service_env(database_url="postgresql+psycopg://postgres@127.0.0.1:1/gone?connect_timeout=2")
    client = TestClient(create_app(), raise_server_exceptions=False)
    response = client.get("/v1/jobs", headers={"Authorization": "Bearer mpk_whatever"})
    assert_error(response, 503, "ServiceUnavailable")
    assert response.headers["Retry-After"] == "5"
    assert client.get("/readyz").status_code == 503


def test_datasets_that_do_not_fit_the_model_answer_422(api: Api) -> None:
    model = upload_ts(api)
    with session_scope() as session:  # what the sandboxed inspection records for an exported program
        record = session.get(StoredModel, model["id"])
        record.status = "ready"
        record.inspection = {
            "kind": "graph",
            "output_shape": [2, 4],
            "input_signature": [{"name": "x", "shape": ["s0", "8"], "dtype": "torch.float32"}],
        }

    def dataset(inputs: np.ndarray, labels: np.ndarray) -> str:
        response = api.client.post(
            "/v1/datasets", headers=api.headers(), files={"file": ("d.npz", npz_bytes(inputs, labels))}
        )
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def submit(dataset_id: str) -> object:
        return api.client.post(
            "/v1/jobs",
            headers=api.headers(),
            json={
                "model_id": model["id"],
                "dataset_id": dataset_id,
                "stages": [{"method": "quantize", "scheme": "dynamic_int8"}],
            },
        )

    fits = dataset(np.zeros((6, 8), np.float32), np.array([0, 1, 2, 3, 0, 1]))
    wrong_shape = dataset(np.zeros((6, 7), np.float32), np.zeros(6, np.int64))
    wrong_labels = dataset(np.zeros((6, 8), np.float32), np.array([0, 1, 2, 3, 4, 9]))
    wrong_dtype = dataset(np.zeros((6, 8), np.int64), np.zeros(6, np.int64))
    assert submit(fits).status_code == 202
    assert "per-sample shape [7]" in assert_error(submit(wrong_shape), 422)["detail"]
    assert "labels span 0..9" in assert_error(submit(wrong_labels), 422)["detail"]
    assert "integers" in assert_error(submit(wrong_dtype), 422)["detail"]
    shape = api.client.post(
        "/v1/jobs",
        headers=api.headers(),
        json={
            "model_id": model["id"],
            "example_input_shape": [1, 9],
            "stages": [{"method": "quantize", "scheme": "dynamic_int8"}],
        },
    )
    assert_error(shape, 422)


def test_dataset_with_mismatched_label_count_is_refused(api: Api) -> None:
    response = api.client.post(
        "/v1/datasets",
        headers=api.headers(),
        files={"file": ("d.npz", npz_bytes(np.zeros((4, 8), np.float32), np.arange(3)))},
    )
    assert "labels" in assert_error(response, 422)["detail"]


def test_deleting_a_model_waits_for_its_jobs_and_removes_its_files(api: Api) -> None:
    model = upload_ts(api)
    job = api.client.post(
        "/v1/jobs",
        headers=api.headers(),
        json={
            "model_id": model["id"],
            "stages": [{"method": "quantize", "scheme": "dynamic_int8"}],
            "example_input_shape": [1, 8],
        },
    ).json()
    assert_error(api.client.delete(f"/v1/models/{model['id']}", headers=api.headers()), 409)
    assert_error(api.client.delete(f"/v1/models/{model['id']}", headers=api.headers(api.other_key)), 404)
    api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=api.headers())
    assert len(stored_files(api)) == 1
    assert api.client.delete(f"/v1/models/{model['id']}", headers=api.headers()).status_code == 204
    assert_error(api.client.get(f"/v1/models/{model['id']}", headers=api.headers()), 404)
    assert_error(api.client.get(f"/v1/jobs/{job['id']}", headers=api.headers()), 404)
    assert stored_files(api) == [] and counts() == (0, 0, 0)


def test_every_preset_validates_on_a_model_it_is_meant_for() -> None:
    from modelpress.catalog import PRESETS, JobFacts, expand_preset, validate_stages

    facts = JobFacts(model_format="state_dict", has_dataset=True, dataset_has_labels=True, eval_has_labels=True)
    for name in PRESETS:
        assert validate_stages(expand_preset(name), facts), name


TOKENS = {"name": "input_ids", "shape": [1, 16], "dtype": "int64", "low": 0, "high": 100, "dynamic": [0, 1]}


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"inputs": [dict(TOKENS, dtype="complex64")]}, "dtype"),
        ({"inputs": [dict(TOKENS, dynamic=[2])]}, "dynamic names dimension 2"),
        ({"inputs": [dict(TOKENS, low=5, high=5)]}, "low must be < high"),
        ({"inputs": [dict(TOKENS, dtype="float32")]}, "take neither"),
        ({"inputs": [TOKENS, TOKENS]}, "declared twice"),
        ({"inputs": [TOKENS], "example_input_shape": [1, 8]}, "not both"),
        ({"inputs": [TOKENS], "forward_kwargs": {"sr": [1, 2]}}, "forward_kwargs"),
        ({"inputs": [dict(TOKENS, shape=[2**20, 2**20])]}, "elements"),
    ],
)
def test_an_invalid_inputs_declaration_answers_422(api: Api, change: dict, fragment: str) -> None:
    model = upload_ts(api)
    spec = {"model_id": model["id"], "stages": [{"method": "quantize", "scheme": "dynamic_int8"}], **change}
    assert fragment in json.dumps(assert_error(api.client.post("/v1/jobs", headers=api.headers(), json=spec), 422))
    assert counts()[2] == 0


def test_model_upload_declares_inputs_that_jobs_default_to(api: Api) -> None:
    bad = api.client.post(
        "/v1/models",
        headers=api.headers(),
        data={"inputs": json.dumps([dict(TOKENS, dynamic=[5])])},
        files={"file": ("mlp.pt", torchscript_bytes(mlp((8, 16, 4))))},
    )
    assert "dynamic" in assert_error(bad, 422)["detail"] and counts()[0] == 0
    declared = [{"name": "x", "shape": [1, 8], "dtype": "float32", "dynamic": [0]}]
    response = api.client.post(
        "/v1/models",
        headers=api.headers(),
        data={"inputs": json.dumps(declared)},
        files={"file": ("mlp.pt", torchscript_bytes(mlp((8, 16, 4))))},
    )
    assert response.status_code == 201, response.text
    model = response.json()
    assert model["inputs"][0]["name"] == "x" and model["inputs"][0]["shape"] == [1, 8]
    # no example_input_shape and no dataset: the model's declared inputs are enough
    job = api.client.post(
        "/v1/jobs",
        headers=api.headers(),
        json={
            "model_id": model["id"],
            "stages": [{"method": "quantize", "scheme": "dynamic_int8"}],
            "forward_kwargs": {},
            "output": 0,
        },
    )
    assert job.status_code == 202, job.text
    assert job.json()["spec"]["inputs"][0]["name"] == "x"


def test_model_upload_declares_constant_arguments_that_jobs_default_to(api: Api) -> None:
    declared = json.dumps([{"name": "x", "shape": [1, 8], "dtype": "float32", "dynamic": [0]}])
    files = {"file": ("mlp.pt", torchscript_bytes(mlp((8, 16, 4))))}
    for bad, fragment in (('{"sr": [1, 2]}', "forward_kwargs.sr"), ("[16000]", "JSON object"), ('{"x": 1}', "x")):
        response = api.client.post(
            "/v1/models", headers=api.headers(), data={"inputs": declared, "forward_kwargs": bad}, files=files
        )
        assert fragment in assert_error(response, 422)["detail"], bad
    assert counts()[0] == 0
    response = api.client.post(
        "/v1/models", headers=api.headers(), data={"inputs": declared, "forward_kwargs": '{"sr": 16000}'}, files=files
    )
    assert response.status_code == 201, response.text
    model = response.json()
    assert model["forward_kwargs"] == {"sr": 16000}
    stages = [{"method": "quantize", "scheme": "dynamic_int8"}]
    job = api.client.post("/v1/jobs", headers=api.headers(), json={"model_id": model["id"], "stages": stages})
    assert job.status_code == 202, job.text
    assert job.json()["spec"]["forward_kwargs"] == {"sr": 16000}
    # a job's own constants replace the model's
    job = api.client.post(
        "/v1/jobs",
        headers=api.headers(),
        json={"model_id": model["id"], "stages": stages, "forward_kwargs": {"sr": 8000}},
    )
    assert job.json()["spec"]["forward_kwargs"] == {"sr": 8000}
