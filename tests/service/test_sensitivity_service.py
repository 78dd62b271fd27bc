"""analyze/sensitivity through the service: a real worker measures the table, the model comes back unchanged."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.engine.transformer_models import tiny_bert, token_ids
from tests.helpers import npz_bytes, sqnr_db
from tests.service.test_end_to_end import Service, start_service

pytestmark = pytest.mark.slow


@pytest.fixture
def embedded(service_env, tmp_path: Path) -> Iterator[Service]:  # type: ignore[no-untyped-def]
    from app.migrate import upgrade

    env = service_env()
    upgrade()
    yield from start_service(env, tmp_path)


def test_analyze_job_reports_the_sorted_table_and_delivers_the_model(embedded: Service) -> None:
    model = tiny_bert(hidden=32, layers=2, heads=2, vocab=100, max_length=16)
    ids = token_ids(16, length=8, vocab=100)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.trace(model, ids[:2]), buffer)
    uploaded = embedded.upload(buffer.getvalue())
    data = embedded.client.post(
        "/v1/datasets", headers=embedded.headers, files={"file": ("tokens.npz", npz_bytes(ids.numpy()))}
    )
    assert data.status_code == 201, data.text
    job = embedded.wait(
        embedded.submit(
            {
                "model_id": uploaded["id"],
                "dataset_id": data.json()["id"],
                "stages": [{"method": "analyze", "scheme": "sensitivity", "pruning": True}],
            }
        )["id"]
    )
    assert job["status"] == "succeeded", job["error"]
    rows = job["metrics"]["sensitivity"]
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    assert sorted(r["layer"] for r in rows) == sorted(linears)
    assert [r["sqnr_db"] for r in rows] == sorted(r["sqnr_db"] for r in rows)
    assert job["metrics"]["stages"][0]["info"]["sensitivity"] == rows
    pruning_rows = job["metrics"]["pruning_sensitivity"]
    assert sorted(r["layer"] for r in pruning_rows) == sorted(linears)
    assert all([r["amount"] for r in row["results"]] == [0.3, 0.5, 0.7] for row in pruning_rows)
    charts = embedded.client.get(f"/v1/jobs/{job['id']}/charts", headers=embedded.headers).json()["charts"]
    assert {"sensitivity", "pruning-sensitivity"} <= {chart["name"] for chart in charts}
    blob = embedded.client.get(f"/v1/jobs/{job['id']}/artifact", headers=embedded.headers).content
    delivered = torch.jit.load(io.BytesIO(blob))
    with torch.no_grad():
        assert torch.equal(delivered(ids), model(ids))  # the model itself, unchanged
    # the worst row, measured here: only that layer quantized, the whole model's output compared
    from worker.compression.base import StageContext
    from worker.compression.quantization import run_stage

    worst = rows[0]["layer"]
    alone = run_stage(
        delivered,
        "dynamic_int8",
        {"skip_layers": [n for n in linears if n != worst]},
        StageContext(kind="torchscript", example_input=ids[:4]),
    ).model
    with torch.no_grad():
        assert sqnr_db(model(ids), alone(ids)) == pytest.approx(rows[0]["sqnr_db"], abs=0.01)
