"""A job for ONNX Runtime through the service: upload -> real worker (sandboxed) -> download -> ORT.

The test loads the downloaded .onnx in its own InferenceSession and compares it with the float
PyTorch model on inputs the service never saw.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.engine.test_targets import TinyResNet, _randomise_batch_norm
from tests.service.test_end_to_end import Service, embedded  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow
ort = pytest.importorskip("onnxruntime")


def _sqnr(reference: torch.Tensor, output: torch.Tensor) -> float:
    return 10 * math.log10(reference.pow(2).mean().item() / (reference - output).pow(2).mean().item())


def test_onnxruntime_static_int8_job_end_to_end(embedded: Service, tmp_path: Path) -> None:  # noqa: F811
    torch.manual_seed(0)
    model = TinyResNet()
    _randomise_batch_norm(model)
    model.eval()
    batch = torch.export.Dim("batch", min=1, max=256)
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 32, 32),), dynamic_shapes=({0: batch},)), buffer)
    uploaded = embedded.upload(buffer.getvalue(), name="resnet.pt2")
    data = io.BytesIO()
    np.savez(data, inputs=torch.randn(64, 3, 32, 32).numpy())
    response = embedded.client.post(
        "/v1/datasets", headers=embedded.headers, files={"file": ("calib.npz", data.getvalue())}
    )
    assert response.status_code == 201, response.text
    dataset_id = response.json()["id"]

    methods = embedded.client.get("/v1/methods", headers=embedded.headers).json()
    ort_runtime = next(r for r in methods["runtimes"] if r["runtime"] == "onnxruntime")
    assert ort_runtime["schemes"]["quantize"] == ["dynamic_int8", "static_int8"]
    refused = embedded.client.post(
        "/v1/jobs",
        headers=embedded.headers,
        json={
            "model_id": uploaded["id"],
            "stages": [{"method": "quantize", "scheme": "fp16"}],
            "example_input_shape": [1, 3, 32, 32],
            "target": {"runtime": "onnxruntime"},
        },
    )
    assert refused.status_code == 422 and "fp16" in refused.text and "onnxruntime" in refused.text

    job = embedded.wait(
        embedded.submit(
            {
                "model_id": uploaded["id"],
                "dataset_id": dataset_id,
                "stages": [{"method": "quantize", "scheme": "static_int8"}],
                "example_input_shape": [1, 3, 32, 32],
                "target": {"runtime": "onnxruntime", "device": "cpu", "threads": 1},
                "output_format": "onnx",
            }
        )["id"],
        timeout=600,
    )
    assert job["status"] == "succeeded", job["error"]
    assert job["artifact"]["format"] == "onnx" and job["artifact"]["requires"] == ["onnxruntime"]
    download = embedded.client.get(f"/v1/jobs/{job['id']}/artifact", headers=embedded.headers)
    assert download.headers["content-disposition"] == f'attachment; filename="{job["id"]}.onnx"'
    blob = download.content
    metrics = job["metrics"]
    assert metrics["runtime"] == "onnxruntime" and metrics["versions"]["onnxruntime"] == ort.__version__
    assert len(blob) == metrics["compressed"]["size_bytes"] < metrics["original"]["size_bytes"]

    path = tmp_path / "artifact.onnx"
    path.write_bytes(blob)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        reference = model(x)
    measured = _sqnr(reference, torch.from_numpy(session.run(None, {"input": x.numpy()})[0]))
    assert measured >= 20
    # other inputs than the service's fidelity set: the two figures agree to within a few dB
    assert abs(measured - metrics["fidelity"]["sqnr_db"]) < 3
