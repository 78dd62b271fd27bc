"""ONNX Runtime target for models called with named inputs or constant arguments (engine level).

The zoo's BERT takes `input_ids` and `attention_mask` with a dynamic batch and sequence; the
int-arg audio model takes `forward(x, sr)` with `sr` a constant of the job. Each job's .onnx is
loaded here in its own InferenceSession, fed by input name at shapes the export never saw, and
compared with the float PyTorch model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests import zoo
from worker.compression.pipeline import JobRequest, run_job

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")

BERT_INPUTS = [
    {"name": "input_ids", "shape": [1, zoo.SEQUENCE], "dtype": "int64", "low": 0, "high": zoo.VOCAB, "dynamic": [0, 1]},
    {"name": "attention_mask", "shape": [1, zoo.SEQUENCE], "dtype": "int64", "low": 1, "high": 2, "dynamic": [0, 1]},
]


def _sqnr(reference: torch.Tensor, output: torch.Tensor) -> float:
    return 10 * math.log10(reference.pow(2).mean().item() / (reference - output).pow(2).mean().item())


def _job(
    tmp_path: Path, program: torch.export.ExportedProgram, stages: list[dict[str, Any]], **extra: Any
) -> tuple[dict[str, Any], Path]:
    source = tmp_path / "model.pt2"
    torch.export.save(program, str(source))
    request = JobRequest.from_dict(
        {
            "model": {"path": str(source), "format": "exported_program"},
            "stages": stages,
            "artifact_path": str(tmp_path / "artifact.onnx"),
            "runtime": "onnxruntime",
            "threads": 1,
            **extra,
        }
    )
    return run_job(request), tmp_path / "artifact.onnx"


def test_bert_with_ids_and_mask_exports_named_inputs_and_int8_keeps_its_hidden_states(tmp_path: Path) -> None:
    entry = zoo.build("bert")
    batch, sequence = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("sequence", min=1, max=64)
    ids, mask = (torch.cat([t, t]) for t in entry.inputs)
    program = torch.export.export(entry.model, (ids, mask), dynamic_shapes=({0: batch, 1: sequence},) * 2)
    generator = torch.Generator().manual_seed(5)
    eval_ids = torch.randint(0, zoo.VOCAB, (24, zoo.SEQUENCE), generator=generator)
    eval_mask = torch.ones_like(eval_ids)
    eval_mask[:, -3:] = 0  # padded tails, as a tokenizer leaves them
    np.savez(tmp_path / "eval.npz", input_ids=eval_ids.numpy(), attention_mask=eval_mask.numpy())
    extra: dict[str, Any] = {"inputs": BERT_INPUTS, "eval_dataset_path": str(tmp_path / "eval.npz")}
    stages = [{"method": "quantize", "scheme": "dynamic_int8", "options": {}}]

    result, artifact = _job(tmp_path, program, stages, **extra)

    assert result["artifact_format"] == "onnx"
    session = ort.InferenceSession(str(artifact), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    # the reported figure, recomputed on the job's eval inputs by name
    hidden = session.run(None, {"input_ids": eval_ids.numpy(), "attention_mask": eval_mask.numpy()})[0]
    with torch.no_grad():
        reference = entry.model(eval_ids, eval_mask)[0]
    measured = _sqnr(reference, torch.from_numpy(hidden))
    assert measured >= 30 and abs(result["metrics"]["fidelity"]["sqnr_db"] - measured) <= 0.5
    # batch and sequence stay dynamic: another batch size and a shorter sequence run
    other_ids, other_mask = eval_ids[:5, :7], eval_mask[:5, :7]
    hidden = session.run(None, {"input_ids": other_ids.numpy(), "attention_mask": other_mask.numpy()})[0]
    assert hidden.shape == (5, 7, 32)
    with torch.no_grad():
        assert _sqnr(entry.model(other_ids, other_mask)[0], torch.from_numpy(hidden)) >= 30


def test_int_argument_model_bakes_the_constant_into_the_onnx_graph(tmp_path: Path) -> None:
    entry = zoo.build("audio")
    (samples,) = entry.inputs
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(entry.model, (samples,), {"sr": 16000}, dynamic_shapes=({0: batch}, None))
    extra: dict[str, Any] = {
        "inputs": [{"name": "x", "shape": [1, 800], "dtype": "float32", "dynamic": [0]}],
        "forward_kwargs": {"sr": 16000},
    }

    result, artifact = _job(tmp_path, program, [], **extra)

    session = ort.InferenceSession(str(artifact), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x"]  # sr is no input: it is the job's constant
    assert result["metrics"]["fidelity"]["sqnr_db"] is None or result["metrics"]["fidelity"]["sqnr_db"] >= 60
    x = torch.randn(7, 800, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = entry.model(x, 16000)
    assert _sqnr(reference, torch.from_numpy(session.run(None, {"x": x.numpy()})[0])) >= 60
