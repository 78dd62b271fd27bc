"""int8 on transformer uploads (issue 15): ViT and GPT-2 as .pt2, TorchScript and a Hugging Face folder.

Each job's artifact is loaded as the README says (torch.jit.load), run at a batch size it was not
traced at, checked to hold the int8 ops its report names, and compared with the float model on the
job's own fidelity inputs (the calibration samples): at least the SQNR the job reported (0.5 dB
slack) and at least 25 dB.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tests import zoo
from worker.compression.base import EngineError
from worker.compression.inputs import output_leaves
from worker.compression.io import save_artifact
from worker.compression.pipeline import JobRequest, run_job
from worker.compression.quantization import count_quantized_ops, sqnr_db
from worker.compression.torchvision_ops import declare_torchvision_ops

SAMPLES = 32
HF_SEQUENCE = 16  # what the engine reads from the tiny GPT-2's config.json for a Hugging Face upload


def _upload(entry: zoo.ZooEntry, model_format: str, folder: Path) -> Path:
    return entry.save_as(model_format, folder)


def _samples(name: str, model_format: str, count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if name == "vit":
        return torch.randn(count, 3, 32, 32, generator=generator)
    sequence = HF_SEQUENCE if model_format == "huggingface" else zoo.SEQUENCE  # an export fixes it
    return torch.randint(0, zoo.VOCAB, (count, sequence), generator=generator)


def _declared(name: str) -> list[dict[str, Any]] | None:
    if name == "vit":
        return [{"name": "x", "shape": [1, 3, 32, 32], "dtype": "float32", "dynamic": [0]}]
    shape = [1, zoo.SEQUENCE]
    return [{"name": "input_ids", "shape": shape, "dtype": "int64", "low": 0, "high": zoo.VOCAB, "dynamic": [0]}]


def _run(
    tmp_path: Path, name: str, model_format: str, scheme: str
) -> tuple[zoo.ZooEntry, dict[str, Any], torch.Tensor]:
    declare_torchvision_ops()  # transformers imports torchvision when it is installed
    torch.manual_seed(0)
    entry = zoo.build(name)
    upload = _upload(entry, model_format, tmp_path)
    calibration = _samples(name, model_format, SAMPLES, seed=1)
    np.savez(tmp_path / "calibration.npz", inputs=calibration.numpy())
    request = JobRequest.from_dict(
        {
            "model": {"path": str(upload), "format": model_format},
            "stages": [{"method": "quantize", "scheme": scheme, "options": {}}],
            "artifact_path": str(tmp_path / "artifact"),
            "inputs": None if model_format == "huggingface" else _declared(name),
            "dataset_path": str(tmp_path / "calibration.npz"),
        }
    )
    return entry, run_job(request), calibration


def _logits(output: Any) -> torch.Tensor:
    return output_leaves(output)[0][1]


CELLS = [
    ("vit", "exported_program", "dynamic_int8"),
    ("vit", "exported_program", "static_int8"),
    ("vit", "torchscript", "dynamic_int8"),
    ("gpt2", "huggingface", "dynamic_int8"),
    ("gpt2", "exported_program", "dynamic_int8"),
    ("gpt2", "exported_program", "static_int8"),
    ("gpt2", "torchscript", "static_int8"),
]


@pytest.mark.parametrize(("name", "model_format", "scheme"), CELLS)
def test_int8_artifact_loads_runs_at_other_batches_and_keeps_its_reported_fidelity(
    tmp_path: Path, one_thread: None, name: str, model_format: str, scheme: str
) -> None:
    entry, job, calibration = _run(tmp_path, name, model_format, scheme)

    assert job["artifact_format"] == "torchscript"
    loaded = torch.jit.load(str(tmp_path / "artifact"))
    info = job["metrics"]["stages"][0]["info"]
    # int8 where the report says int8: one quantized op per quantized layer at least
    assert len(info["quantized_layers"]) >= 5
    assert count_quantized_ops(loaded) >= len(info["quantized_layers"])
    with torch.no_grad():
        measured = sqnr_db(_logits(entry.model(calibration)), _logits(loaded(calibration)))
        # a batch size the trace did not see (it is made at 2)
        other = _samples(name, model_format, 3, seed=2)
        assert _logits(loaded(other)).shape == _logits(entry.model(other)).shape
    reported = job["metrics"]["fidelity"]["sqnr_db"]
    assert measured >= reported - 0.5
    assert measured >= 25


def test_gpt2_int8_reaches_its_conv1d_projections(tmp_path: Path, one_thread: None) -> None:
    """transformers' Conv1D holds GPT-2's attention and MLP weights; as nn.Linear they are int8 too."""
    _, job, _ = _run(tmp_path, "gpt2", "huggingface", "dynamic_int8")

    quantized = job["metrics"]["stages"][0]["info"]["quantized_layers"]
    for block in range(2):
        for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            assert f"transformer.h.{block}.{layer}" in quantized
    assert not [w for w in job["metrics"]["warnings"] if "left unchanged" in w]


def test_gpt2_torchscript_dynamic_int8_says_it_leaves_conv1d_float(tmp_path: Path, one_thread: None) -> None:
    _, job, _ = _run(tmp_path, "gpt2", "torchscript", "dynamic_int8")

    info = job["metrics"]["stages"][0]["info"]
    assert info["quantized_layers"] == ["lm_head"]
    assert len(info["left_float"]) == 8
    assert all("Conv1D" in reason for reason in info["left_float"].values())
    assert any(w.startswith("Conv1D layers hold") for w in job["metrics"]["warnings"])


def test_vit_torchscript_static_int8_is_refused_naming_the_op(tmp_path: Path, one_thread: None) -> None:
    """The TorchScript converter cannot take MultiheadAttention's traced head split (its sizes were
    read off tensors); the refusal names the op and the upload that works."""
    with pytest.raises(EngineError, match=r"aten\.view\.default takes a size computed from tensor values.*exported"):
        _run(tmp_path, "vit", "torchscript", "static_int8")


class FixedBatch(nn.Module):
    """Turns its batch size into a Python int, which a trace keeps as the constant it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).reshape(int(x.shape[0]) * 2)


def test_a_trace_that_keeps_its_batch_is_refused(tmp_path: Path) -> None:
    model = FixedBatch().eval()
    with pytest.raises(EngineError, match="made at batch 2.*does not run at batch 1.*exported_program"):
        save_artifact(model, "eager", "torchscript", tmp_path / "artifact", torch.randn(1, 4))


def test_static_int8_keeps_a_timm_vits_residual_stream_and_layer_norms_float(tmp_path: Path, one_thread: None) -> None:
    """torch's x86 mapping quantizes adds and functional layer norms too; on timm's ViT that left 8 dB."""
    pytest.importorskip("timm")
    from worker.compression.registry import build_architecture

    architecture = {"name": "timm.vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2}}
    torch.manual_seed(0)
    model = build_architecture(architecture["name"], architecture["kwargs"]).eval()
    torch.save(model.state_dict(), tmp_path / "vit.pt")
    calibration = _samples("vit", "state_dict", SAMPLES, seed=1)
    np.savez(tmp_path / "calibration.npz", inputs=calibration.numpy())
    job = run_job(
        JobRequest.from_dict(
            {
                "model": {"path": str(tmp_path / "vit.pt"), "format": "state_dict", "architecture": architecture},
                "stages": [{"method": "quantize", "scheme": "static_int8", "options": {}}],
                "artifact_path": str(tmp_path / "artifact"),
                "inputs": _declared("vit"),
                "dataset_path": str(tmp_path / "calibration.npz"),
            }
        )
    )

    loaded = torch.jit.load(str(tmp_path / "artifact"))
    kinds = {node.kind() for node in loaded.inlined_graph.nodes()}
    assert "quantized::linear" in kinds
    assert not kinds & {"quantized::add", "quantized::layer_norm"}
    with torch.no_grad():
        measured = sqnr_db(model(calibration), loaded(calibration))
    assert measured >= job["metrics"]["fidelity"]["sqnr_db"] - 0.5
    assert measured >= 25
