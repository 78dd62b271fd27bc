"""Upload trials through the real parts: a real Celery worker tries each main scheme on a new upload in its
bubblewrap sandbox, the model's inspection keeps the results, and the API refuses at submit, with the
trial's sentence, a scheme that failed on it. A trial that crashes the process natively costs only its
own scheme: the rest are tried in a fresh child."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import OneLayer, exported_bytes, wait_for
from tests.service.test_end_to_end import Service, start_service
from worker.compression.trial_plan import ALL_TRIALS

pytestmark = pytest.mark.slow


@pytest.fixture
def embedded(service_env, tmp_path) -> Iterator[Service]:  # type: ignore[no-untyped-def]
    from app.migrate import upgrade

    env = service_env()
    upgrade()
    yield from start_service(env, tmp_path)


def _ready(service: Service, model_id: str) -> dict[str, Any]:
    def inspected() -> dict[str, Any] | None:
        model = service.client.get(f"/v1/models/{model_id}", headers=service.headers).json()
        return model if model["status"] != "pending" else None

    model = wait_for(inspected, 240, "the upload's inspection and trials")
    assert model["status"] == "ready", model
    return model


def test_a_scheme_that_failed_on_the_upload_is_refused_at_submit_with_its_reason(embedded: Service) -> None:
    torch.manual_seed(0)
    uploaded = embedded.upload(exported_bytes(OneLayer().eval(), torch.randn(4, 16)), "one-layer.pt2")
    model = _ready(embedded, uploaded["id"])

    results = model["inspection"]["scheme_trials"]["results"]
    assert set(results) == set(ALL_TRIALS)
    assert results["quantize:dynamic_int8"]["ok"] is True
    assert results["prune:ln_structured"]["ok"] is False

    refused = embedded.client.post(
        "/v1/jobs",
        headers=embedded.headers,
        json={"model_id": uploaded["id"], "stages": [{"method": "prune", "scheme": "ln_structured", "amount": 0.3}]},
    )
    assert refused.status_code == 422, refused.text
    assert "tried on this model when it was uploaded and failed" in refused.text
    assert "prunable layer" in refused.text

    # what the trial passed runs for real, and the artifact does what the trial said it would
    job = embedded.wait(
        embedded.submit(
            {
                "model_id": uploaded["id"],
                "example_input_shape": [2, 16],
                "stages": [{"method": "quantize", "scheme": "dynamic_int8"}],
            }
        )["id"]
    )
    assert job["status"] == "succeeded", job["error"]
    blob = embedded.client.get(f"/v1/jobs/{job['id']}/artifact", headers=embedded.headers).content
    # an exported program's int8 artifact is TorchScript: torch's int8 kernels run in its interpreter
    assert job["artifact"]["format"] == "torchscript"
    quantized = torch.jit.load(io.BytesIO(blob))
    torch.manual_seed(0)
    original, inputs = OneLayer().eval(), torch.randn(32, 16)
    with torch.no_grad():
        reference, output = original(inputs), quantized(inputs)
    sqnr = 10 * torch.log10(reference.pow(2).mean() / (reference - output).pow(2).mean())
    assert sqnr > 25 and results["quantize:dynamic_int8"]["sqnr_db"] > 25


CRASHER = """
import os
import signal

import torch
from torch import nn


class QuantCrasher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # what a native crash in an int8 kernel looks like from outside: the process dies of SIGSEGV
        if type(self.fc1).__module__.startswith("torch.ao.nn.quantized"):
            os.kill(os.getpid(), signal.SIGSEGV)
        return self.fc2(torch.relu(self.fc1(x)))
"""


def _install_crasher(folder: Path) -> None:
    (folder / "modelpress_quant_crasher.py").write_text(CRASHER)
    info = folder / "modelpress_quant_crasher-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: modelpress-quant-crasher\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[modelpress.architectures]\nquant_crasher = modelpress_quant_crasher:QuantCrasher\n"
    )


def test_a_trial_that_crashes_natively_refuses_only_its_scheme(service_env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from worker.slots import discard_warm_sandbox
    from worker.upload_trials import try_schemes

    service_env(warm_sandbox="false")
    torch.manual_seed(0)
    weights = tmp_path / "weights.pt"
    torch.save(
        {
            k: torch.randn(v)
            for k, v in {"fc1.weight": (16, 8), "fc1.bias": (16,), "fc2.weight": (4, 16), "fc2.bias": (4,)}.items()
        },
        weights,
    )
    children: list[Path] = []

    def fetch(folder: Path) -> dict[str, Any]:
        # the architecture comes as an installed package would bring it: an entry point in the child's folder
        _install_crasher(folder)
        children.append(folder)
        path = folder / "model.state_dict"
        path.write_bytes(weights.read_bytes())
        return {"path": str(path), "format": "state_dict", "architecture": {"name": "quant_crasher"}}

    declared = [{"name": "x", "shape": [1, 8], "dtype": "float32", "dynamic": [0]}]
    try:
        trials = try_schemes("crasher", fetch, declared, {"parameters": 212}, "bubblewrap")
    finally:
        discard_warm_sandbox()

    results = trials["results"]
    assert set(results) == set(ALL_TRIALS)
    crash = results["quantize:dynamic_int8"]
    assert crash["ok"] is False and crash["crashed"] is True and "SIGSEGV" in crash["reason"]
    # the schemes after it ran in a fresh child, each to its own outcome
    assert len(children) == 2
    assert results["prune:l1_unstructured"]["ok"] is True and results["quantize:fp16"]["ok"] is True
