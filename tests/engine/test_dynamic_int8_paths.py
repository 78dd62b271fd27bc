"""Surviving the deprecations: dynamic_int8 off torch.ao (lifter, path selection, torchao path) and .pt2 by default."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import zoo
from tests.helpers import exported_bytes, mlp, torchscript_bytes
from worker.compression.base import StageContext
from worker.compression.pipeline import JobRequest, run_job
from worker.compression.quantization import TORCHAO_DYNAMIC, backend_for, dynamic_torchao, run_stage, sqnr_db

DYNAMIC = {"skip_layers": [], "keep_first_last_float": False}


def test_dynamic_int8_on_an_exported_vit_lifts_attention_projections() -> None:
    """Regression: the lifter put MultiheadAttention's in_proj layer on `attn` itself, so the module
    swap dropped attn.out_proj ("'Linear' object has no attribute 'out_proj'")."""
    entry = zoo.build("vit")
    (images,) = entry.inputs
    batch = torch.export.Dim("batch", min=1, max=64)
    graph = torch.export.export(entry.model, (images,), dynamic_shapes=({0: batch},)).module()

    result = run_stage(graph, "dynamic_int8", DYNAMIC, StageContext("graph", images))

    quantized = set(result.info["quantized_layers"])
    assert {"blocks.0.attn.in_proj", "blocks.0.attn.out_proj", "blocks.1.attn.in_proj", "head"} <= quantized
    # what the user downloads for this backend: the traced module, loaded back
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.trace(result.model, images), buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    # another batch than the trace's: the class token's expand follows the input's batch
    other = torch.randn(len(images) + 3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert sqnr_db(entry.model(other), loaded(other)) >= 20
    # no float copy of a lifted weight is left beside its int8 layer
    assert not [name for name in result.model.state_dict() if name.endswith("in_proj_weight")]


def _job(tmp_path: Path, model_bytes: bytes, model_format: str, shape: list[int]) -> JobRequest:
    source = tmp_path / "model.upload"
    source.write_bytes(model_bytes)
    return JobRequest.from_dict(
        {
            "model": {"path": str(source), "format": model_format},
            "stages": [{"method": "quantize", "scheme": "dynamic_int8", "options": dict(DYNAMIC)}],
            "artifact_path": str(tmp_path / "artifact"),
            "example_input_shape": shape,
        }
    )


def test_torch_ao_runs_dynamic_int8_while_it_is_there_and_faster() -> None:
    assert dynamic_torchao.torch_ao_dynamic_available()
    assert backend_for("dynamic_int8", "eager").library == "torch.ao.quantization.quantize_dynamic"


@pytest.mark.parametrize("model_format", ["exported_program", "torchscript"])
def test_without_torch_ao_dynamic_int8_runs_through_torchao_and_downloads_a_pt2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_format: str
) -> None:
    monkeypatch.setattr(dynamic_torchao, "torch_ao_dynamic_available", lambda: False)
    assert backend_for("dynamic_int8", "graph") is TORCHAO_DYNAMIC
    torch.manual_seed(0)
    model = mlp((64, 256, 10)).eval()
    example = torch.randn(4, 64)
    upload = exported_bytes(model, example) if model_format == "exported_program" else torchscript_bytes(model)

    result = run_job(_job(tmp_path, upload, model_format, [1, 64]))

    assert result["artifact_format"] == "exported_program" and result["requires"] == ["torchao"]
    stage = result["metrics"]["stages"][0]
    assert stage["info"]["backend"] == TORCHAO_DYNAMIC.library
    assert stage["info"]["quantized_layers"] == ["0", "2"]
    # the artifact as the README loads it, at a batch size the export never saw
    import torchao  # noqa: F401  (registers the quant primitives the graph calls)

    loaded = torch.export.load(str(tmp_path / "artifact")).module()
    inputs = torch.randn(7, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert sqnr_db(model(inputs), loaded(inputs)) >= 20


def test_an_eager_upload_downloads_as_an_exported_program_by_default(tmp_path: Path) -> None:
    """torch.jit is deprecated: results of state_dict uploads come back as .pt2 unless asked otherwise."""
    torch.manual_seed(0)
    model = mlp((64, 128, 10)).eval()
    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    evaluation = torch.randn(40, 64, generator=torch.Generator().manual_seed(4))
    np.savez(tmp_path / "eval.npz", inputs=evaluation.numpy())
    request = JobRequest.from_dict(
        {
            "model": {
                "path": str(weights),
                "format": "state_dict",
                "architecture": {"name": "mlp", "kwargs": {"widths": [64, 128, 10]}},
            },
            "stages": [{"method": "quantize", "scheme": "fp16", "options": {"skip_layers": []}}],
            "artifact_path": str(tmp_path / "artifact"),
            "eval_dataset_path": str(tmp_path / "eval.npz"),
        }
    )

    result = run_job(request)

    assert result["artifact_format"] == "exported_program"
    loaded = torch.export.load(str(tmp_path / "artifact")).module()  # the README's loading line
    with torch.no_grad():
        measured = sqnr_db(model(evaluation), loaded(evaluation).float())
        assert loaded(evaluation[:3]).shape == (3, 10)  # the batch is not specialised
    assert measured >= 40 and abs(result["metrics"]["fidelity"]["sqnr_db"] - measured) <= 0.5
