"""Deployment targets: ONNX Runtime and ExecuTorch artifacts, loaded back in their runtime by the test.

Each artifact is built by the engine's `run_job`, then loaded here with the README's own code and
compared with the float PyTorch model on the job's fidelity inputs (the eval set the test gives):
the test's SQNR must match the reported one within 0.5 dB and meet the issue's floors.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from worker.compression.base import EngineError
from worker.compression.pipeline import JobRequest, run_job

pytest.importorskip("onnxruntime")
README = Path(__file__).resolve().parents[2] / "README.md"


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(Block(16), Block(16))
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class TinyBert(nn.Module):
    """Two post-norm encoder layers over token embeddings; returns the hidden states."""

    def __init__(self, width: int = 64, heads: int = 4) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.encoder(x))


def _randomise_batch_norm(model: nn.Module) -> None:
    # trained-looking statistics, so folding BatchNorm is exercised with non-trivial values
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)


def _write_job(folder: Path, model: nn.Module, shape: tuple[int, ...], seed: int) -> tuple[Path, Path, Path]:
    generator = torch.Generator().manual_seed(seed)
    model_path = folder / "model.pt2"
    batch = torch.export.Dim("batch", min=1, max=512)
    program = torch.export.export(model, (torch.randn(2, *shape),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(model_path))
    train, evaluation = folder / "train.npz", folder / "eval.npz"
    np.savez(train, inputs=torch.randn(64, *shape, generator=generator).numpy())
    np.savez(evaluation, inputs=torch.randn(48, *shape, generator=generator).numpy())
    return model_path, train, evaluation


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, Path, Path]:
    torch.manual_seed(0)
    model = TinyResNet()
    _randomise_batch_norm(model)
    model.eval()
    return (model, *_write_job(tmp_path_factory.mktemp("cnn"), model, (3, 32, 32), 1))


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, Path, Path]:
    torch.manual_seed(0)
    model = TinyBert().eval()
    return (model, *_write_job(tmp_path_factory.mktemp("bert"), model, (16, 64), 2))


def _run(
    job: tuple[nn.Module, Path, Path, Path],
    tmp_path: Path,
    runtime: str,
    stages: list[dict[str, Any]],
    example_shape: list[int],
) -> tuple[dict[str, Any], Path]:
    _, model_path, train, evaluation = job
    suffix = "onnx" if runtime == "onnxruntime" else "pte"
    artifact = tmp_path / f"artifact.{suffix}"
    request = JobRequest.from_dict(
        {
            "model": {"path": str(model_path), "format": "exported_program"},
            "stages": stages,
            "artifact_path": str(artifact),
            "example_input_shape": example_shape,
            "dataset_path": str(train),
            "eval_dataset_path": str(evaluation),
            "runtime": runtime,
            "threads": 1,
        }
    )
    return run_job(request), artifact


def _readme_loading_code() -> str:
    text = README.read_text()
    section = text[text.index("### ONNX Runtime and ExecuTorch artifacts") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


def _load_with_readme_code(artifact: Path, x: np.ndarray, which: str) -> np.ndarray:
    """Run the README's loading code in the artifact's folder; returns `onnx_out` or `pte_out`."""
    code = _readme_loading_code()
    onnx_at, pte_at = code.index('# output_format "onnx"'), code.index('# output_format "executorch"')
    header, onnx_part, pte_part = code[:onnx_at], code[onnx_at:pte_at], code[pte_at:]
    namespace: dict[str, Any] = {"x": x}
    cwd = Path.cwd()
    try:
        import os

        os.chdir(artifact.parent)
        exec(header + (onnx_part if which == "onnx" else pte_part), namespace)
    finally:
        os.chdir(cwd)
    return np.asarray(namespace[f"{which}_out"])


def _sqnr(reference: torch.Tensor, output: torch.Tensor) -> float:
    noise = (reference - output).pow(2).mean().item()
    return math.inf if noise == 0 else 10 * math.log10(reference.pow(2).mean().item() / noise)


def _eval_inputs(job: tuple[nn.Module, Path, Path, Path]) -> torch.Tensor:
    with np.load(job[3]) as archive:
        return torch.from_numpy(archive["inputs"])


def _check_reported(result: dict[str, Any], measured: float, floor: float, runtime: str) -> None:
    reported = result["metrics"]["fidelity"]["sqnr_db"]
    assert measured >= floor, f"{runtime}: measured {measured:.1f} dB < {floor}"
    assert reported is not None and abs(reported - measured) <= 0.5, (reported, measured)
    assert result["metrics"]["runtime"] == runtime
    assert runtime in result["metrics"]["versions"]
    assert result["metrics"]["original"]["measured_in"] == runtime


def test_onnx_fp32_cnn_matches_torch(cnn: Any, tmp_path: Path, one_thread: None) -> None:
    result, artifact = _run(cnn, tmp_path, "onnxruntime", [], [1, 3, 32, 32])
    assert result["artifact_format"] == "onnx" and result["requires"] == ["onnxruntime"]
    inputs = _eval_inputs(cnn)
    outputs = torch.from_numpy(_load_with_readme_code(artifact, inputs.numpy(), "onnx"))
    with torch.no_grad():
        reference = cnn[0](inputs)
    _check_reported(result, _sqnr(reference, outputs), 60.0, "onnxruntime")
    assert result["metrics"]["compressed"]["size_bytes"] == artifact.stat().st_size


def test_ort_static_qdq_int8_cnn(cnn: Any, tmp_path: Path, one_thread: None) -> None:
    import onnx

    stages = [{"method": "quantize", "scheme": "static_int8", "options": {"calibration_batches": 2}}]
    result, artifact = _run(cnn, tmp_path, "onnxruntime", stages, [1, 3, 32, 32])
    ops = {node.op_type for node in onnx.load(str(artifact)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format, as ORT's static quantizer writes it
    inputs = _eval_inputs(cnn)
    outputs = torch.from_numpy(_load_with_readme_code(artifact, inputs.numpy(), "onnx"))
    with torch.no_grad():
        reference = cnn[0](inputs)
    measured = _sqnr(reference, outputs)
    _check_reported(result, measured, 20.0, "onnxruntime")
    metrics = result["metrics"]
    # the float original exported to ONNX is the baseline: int8 weights make the file smaller than it
    assert metrics["compressed"]["size_bytes"] < metrics["original"]["size_bytes"]
    assert metrics["stages"][-1]["info"]["calibration_samples"] == 64
    print(f"ORT static QDQ int8 CNN: {measured:.1f} dB")


def test_ort_dynamic_int8_bert_hidden_states(bert: Any, tmp_path: Path, one_thread: None) -> None:
    import onnx

    stages = [{"method": "quantize", "scheme": "dynamic_int8", "options": {}}]
    result, artifact = _run(bert, tmp_path, "onnxruntime", stages, [1, 16, 64])
    ops = {node.op_type for node in onnx.load(str(artifact)).graph.node}
    assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops, ops
    inputs = _eval_inputs(bert)
    outputs = torch.from_numpy(_load_with_readme_code(artifact, inputs.numpy(), "onnx"))
    with torch.no_grad():
        reference = bert[0](inputs)
    measured = _sqnr(reference, outputs)
    _check_reported(result, measured, 30.0, "onnxruntime")
    print(f"ORT dynamic int8 BERT: {measured:.1f} dB")


@pytest.mark.parametrize(
    "stages",
    [[], [{"method": "quantize", "scheme": "static_int8", "options": {"calibration_batches": 2}}]],
    ids=["fp32", "int8"],
)
def test_executorch_cnn(cnn: Any, tmp_path: Path, one_thread: None, stages: list[dict[str, Any]]) -> None:
    pytest.importorskip("executorch")
    result, artifact = _run(cnn, tmp_path, "executorch", stages, [4, 3, 32, 32])
    assert artifact.read_bytes()[4:8].startswith(b"ET")  # the .pte flatbuffer identifier
    inputs = _eval_inputs(cnn)[:4]
    outputs = torch.from_numpy(_load_with_readme_code(artifact, inputs.numpy(), "pte"))
    with torch.no_grad():
        reference = cnn[0](inputs)
    floor = 60.0 if not stages else 20.0
    assert _sqnr(reference, outputs) >= floor
    # the reported figure covers all 48 eval inputs; recompute it on them the way the README runs the program
    chunks = [
        torch.from_numpy(_load_with_readme_code(artifact, chunk.numpy(), "pte")) for chunk in _eval_inputs(cnn).split(4)
    ]
    with torch.no_grad():
        full_reference = cnn[0](_eval_inputs(cnn))
    _check_reported(result, _sqnr(full_reference, torch.cat(chunks)), floor, "executorch")


class UsesZeta(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.linear(x)
        return torch.special.zeta(hidden, hidden + 2.0)


def test_onnx_export_failure_names_the_op_and_its_source_line(tmp_path: Path) -> None:
    from worker.compression.targets.onnx_runtime import export_onnx

    with pytest.raises(EngineError) as caught:
        export_onnx(UsesZeta().eval(), torch.randn(2, 8), tmp_path / "zeta.onnx")
    message = str(caught.value)
    assert "zeta" in message and "test_targets.py:" in message and "in forward" in message, message
    assert "Traceback" not in message and "\n" not in message
