"""Quantization stage: representation changes, accuracy (SQNR / top-1), artifact size and loadability."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from worker.compression.base import Dataset, EngineError, ModelKind, StageContext
from worker.compression.quantization import (
    BACKENDS,
    backend_for,
    count_quantized_ops,
    plan_layers,
    run_stage,
    sqnr_db,
    torch_level_module,
)

DYNAMIC = {"skip_layers": [], "keep_first_last_float": False}
STATIC = {"skip_layers": [], "keep_first_last_float": False, "calibration_batches": 16}
HALF = {"skip_layers": []}
BATCH = torch.export.Dim("batch", min=1, max=1024)


class MLP(nn.Module):
    def __init__(self, width: int = 256, hidden: int = 1024) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class RecurrentTagger(nn.Module):
    """An LSTM with data-dependent control flow; only scriptable, not traceable."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 64)
        self.lstm = nn.LSTM(64, 64, batch_first=True)
        self.head = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.lstm(torch.relu(self.embed(x)))
        last = hidden[:, -1]
        if bool(last.mean() > 0):
            last = last * 2.0
        return self.head(last)


class ConvOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3))


class LeNet(nn.Module):
    """The LeNet-style CNN of the contract check, for 8x8 digits flattened to 64 values."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(256, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, 8, 8)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def script_roundtrip(module: nn.Module) -> tuple[torch.jit.ScriptModule, int]:
    """Save with torch.jit.save and load back; returns the loaded module and the file size."""
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    size = len(buffer.getvalue())
    buffer.seek(0)
    return torch.jit.load(buffer), size


def export_roundtrip(module: nn.Module, example: torch.Tensor) -> tuple[nn.Module, int]:
    program = torch.export.export(module, (example,), dynamic_shapes=({0: BATCH},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    size = len(buffer.getvalue())
    buffer.seek(0)
    return torch.export.load(buffer).module(), size


def exported(module: nn.Module, example: torch.Tensor) -> nn.Module:
    return torch.export.export(module.eval(), (example,), dynamic_shapes=({0: BATCH},)).module()


def accuracy(model: Any, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(inputs).argmax(1) == labels).float().mean())


@pytest.fixture(scope="module")
def mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return MLP().eval(), torch.randn(32, 256)


# --------------------------------------------------------------------------- helpers


def test_sqnr_db_matches_definition() -> None:
    reference = torch.tensor([1.0, -1.0, 1.0, -1.0])
    assert sqnr_db(reference, reference * 1.1) == pytest.approx(20.0)


def test_plan_layers_applies_globs_and_ends() -> None:
    plan = plan_layers(["a.0", "a.1", "b", "c"], {"skip_layers": ["a.*"], "keep_first_last_float": True})
    assert plan.targets == ["b"]
    assert plan.skipped == ["a.0", "a.1", "c"]


def test_every_backend_is_reachable_and_unknown_pairs_raise() -> None:
    assert backend_for("dynamic_int8", "torchscript") is BACKENDS[("dynamic_int8", "torchscript")]
    with pytest.raises(EngineError, match="cannot take a torchscript model"):
        backend_for("static_int8", "torchscript")
    with pytest.raises(EngineError, match="unknown quantization scheme"):
        backend_for("int3", "eager")


# --------------------------------------------------------------------------- dynamic int8


def test_dynamic_int8_eager_swaps_linears_and_shrinks(mlp: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = mlp
    reference = copy.deepcopy(model)
    result = run_stage(model, "dynamic_int8", DYNAMIC, StageContext("eager", x))

    assert result.kind == "eager" and result.preferred_output_format == "torchscript"
    assert result.info["quantized_layers"] == ["fc1", "fc2", "fc3"]
    assert all(
        isinstance(result.model.get_submodule(n), torch.ao.nn.quantized.dynamic.Linear) for n in ("fc1", "fc2", "fc3")
    )
    assert type(model.fc1) is nn.Linear  # the input model is left alone
    loaded, size = script_roundtrip(torch.jit.trace(result.model, x))
    _, float_size = script_roundtrip(torch.jit.trace(reference, x))
    assert count_quantized_ops(loaded) == 3
    assert size <= 0.3 * float_size
    with torch.no_grad():
        assert sqnr_db(reference(x), loaded(x)) >= 20


def test_dynamic_int8_torchscript_rewrites_the_graph(mlp: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = mlp
    scripted, float_size = script_roundtrip(torch.jit.script(copy.deepcopy(model)))
    result = run_stage(scripted, "dynamic_int8", DYNAMIC, StageContext("torchscript", x))

    assert result.kind == "torchscript"
    assert result.info["quantized_ops"] == 3 and result.info["quantized_layers"] == ["fc1", "fc2", "fc3"]
    loaded, size = script_roundtrip(result.model)
    assert count_quantized_ops(loaded) == 3
    assert count_quantized_ops(scripted) == 0  # the upload is not modified
    assert size <= 0.3 * float_size
    with torch.no_grad():
        assert sqnr_db(model(x), loaded(x)) >= 20


def test_dynamic_int8_torchscript_with_lstm_and_control_flow() -> None:
    torch.manual_seed(0)
    model = RecurrentTagger().eval()
    scripted, _ = script_roundtrip(torch.jit.script(model))
    x = torch.randn(4, 5, 16)
    result = run_stage(scripted, "dynamic_int8", DYNAMIC, StageContext("torchscript", x))

    assert result.info["quantized_layers"] == ["embed", "head"]
    assert "lstm" in result.info["left_float"]
    loaded, _ = script_roundtrip(result.model)
    assert count_quantized_ops(loaded) == 2
    with torch.no_grad():
        assert sqnr_db(model(x), loaded(x)) >= 20
        assert sqnr_db(model(-x), loaded(-x)) >= 20  # the other branch too


def test_dynamic_int8_eager_quantizes_lstm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.LSTM(16, 32)).eval()
    x = torch.randn(5, 2, 16)
    result = run_stage(model, "dynamic_int8", DYNAMIC, StageContext("eager", x))
    assert result.info["quantized_layers"] == ["0"]
    assert isinstance(result.model[0], torch.ao.nn.quantized.dynamic.LSTM)


def test_dynamic_int8_exported_graph(mlp: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = mlp
    result = run_stage(exported(model, x), "dynamic_int8", DYNAMIC, StageContext("graph", x))

    assert result.kind == "eager" and result.preferred_output_format == "torchscript"
    assert result.info["quantized_layers"] == ["fc1", "fc2", "fc3"]
    loaded, _ = script_roundtrip(torch.jit.trace(result.model, x))
    assert count_quantized_ops(loaded) == 3
    with torch.no_grad():
        other_batch = torch.randn(7, 256)
        assert sqnr_db(model(other_batch), loaded(other_batch)) >= 20


@pytest.mark.parametrize("kind", ["eager", "torchscript"])
@pytest.mark.parametrize(
    ("options", "quantized", "skipped"),
    [
        ({"skip_layers": ["fc2"], "keep_first_last_float": False}, ["fc1", "fc3"], ["fc2"]),
        ({"skip_layers": [], "keep_first_last_float": True}, ["fc2"], ["fc1", "fc3"]),
    ],
)
def test_dynamic_int8_respects_skips(
    kind: ModelKind, options: dict[str, Any], quantized: list[str], skipped: list[str]
) -> None:
    torch.manual_seed(0)
    model = MLP(32, 64).eval()
    x = torch.randn(4, 32)
    upload = torch.jit.script(model) if kind == "torchscript" else model
    result = run_stage(upload, "dynamic_int8", options, StageContext(kind, x))

    assert result.info["quantized_layers"] == quantized and result.info["skipped_layers"] == skipped
    if kind == "torchscript":
        assert count_quantized_ops(result.model) == len(quantized)
    else:
        for name in ("fc1", "fc2", "fc3"):
            assert (type(result.model.get_submodule(name)) is nn.Linear) == (name in skipped)


@pytest.mark.parametrize("kind", ["eager", "torchscript", "graph"])
def test_dynamic_int8_without_linears_is_an_error(kind: ModelKind) -> None:
    model = ConvOnly().eval()
    x = torch.randn(2, 3, 8, 8)
    upload = {"eager": model, "torchscript": torch.jit.script(model), "graph": exported(model, x)}[kind]
    with pytest.raises(EngineError, match="no (Linear|linear)"):
        run_stage(upload, "dynamic_int8", DYNAMIC, StageContext(kind, x))


@pytest.mark.parametrize("kind", ["eager", "torchscript"])
def test_dynamic_int8_with_every_layer_skipped_is_an_error(kind: ModelKind) -> None:
    model = MLP(32, 64).eval()
    x = torch.randn(4, 32)
    upload = torch.jit.script(model) if kind == "torchscript" else model
    with pytest.raises(EngineError, match="excluded by skip_layers"):
        run_stage(
            upload, "dynamic_int8", {"skip_layers": ["fc*"], "keep_first_last_float": False}, StageContext(kind, x)
        )


# --------------------------------------------------------------------------- static int8


@pytest.fixture(scope="module")
def digits() -> dict[str, Any]:
    from sklearn.datasets import load_digits

    data = load_digits()
    inputs = torch.tensor(data.data / 16, dtype=torch.float32)
    labels = torch.tensor(data.target)
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    torch.manual_seed(0)
    model = LeNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        for start in range(0, len(train), 128):
            batch = train[start : start + 128]
            optimizer.zero_grad()
            F.cross_entropy(model(inputs[batch]), labels[batch]).backward()
            optimizer.step()
    model.eval()
    return {
        "model": model,
        "train": Dataset(inputs[train[:128]], labels[train[:128]]),
        "test_x": inputs[test],
        "test_y": labels[test],
        "example": inputs[train[:4]],
    }


LOAD_AND_SCORE = textwrap.dedent("""
    import sys, torch
    model = torch.jit.load(sys.argv[1])
    inputs, labels = torch.load(sys.argv[2])
    with torch.no_grad():
        print((model(inputs).argmax(1) == labels).float().mean().item())
""")


def test_static_int8_exported_cnn_keeps_accuracy_and_shrinks(digits: dict[str, Any], tmp_path: Path) -> None:
    float_model, example = digits["model"], digits["example"]
    program = torch.export.export(float_model, (example,), dynamic_shapes=({0: BATCH},))
    torch.export.save(program, tmp_path / "float.pt2")
    float_accuracy = accuracy(float_model, digits["test_x"], digits["test_y"])
    assert float_accuracy >= 0.9

    ctx = StageContext("graph", example, train_data=digits["train"])
    result = run_stage(program.module(), "static_int8", STATIC, ctx)
    assert result.info["quantized_layers"] == ["conv1", "conv2", "fc1", "fc2"]
    assert result.info["calibration_samples"] == 128
    assert result.preferred_output_format == "torchscript" and result.requires == []
    artifact = tmp_path / "quantized.pt"
    torch.jit.save(torch.jit.trace(result.model, example), artifact)
    assert artifact.stat().st_size <= 0.35 * (tmp_path / "float.pt2").stat().st_size

    # a fresh interpreter with nothing but torch loads the artifact and scores it at another batch size
    torch.save((digits["test_x"], digits["test_y"]), tmp_path / "test.pt")
    run = subprocess.run(
        [sys.executable, "-c", LOAD_AND_SCORE, str(artifact), str(tmp_path / "test.pt")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert float(run.stdout.strip().splitlines()[-1]) >= float_accuracy - 0.02


def test_static_int8_eager_cnn_with_skips(digits: dict[str, Any]) -> None:
    ctx = StageContext("eager", digits["example"], train_data=digits["train"])
    result = run_stage(digits["model"], "static_int8", {**STATIC, "skip_layers": ["conv2"]}, ctx)

    assert result.info["quantized_layers"] == ["conv1", "fc1", "fc2"] and result.info["skipped_layers"] == ["conv2"]
    assert result.model.get_submodule("conv2")[0].weight.dtype == torch.float32  # fused with its ReLU, float
    assert "quantized" in type(result.model.get_submodule("conv1")).__module__
    loaded, _ = script_roundtrip(torch.jit.trace(result.model, digits["example"]))
    float_accuracy = accuracy(digits["model"], digits["test_x"], digits["test_y"])
    assert accuracy(loaded, digits["test_x"], digits["test_y"]) >= float_accuracy - 0.02


def test_static_int8_needs_calibration_data(digits: dict[str, Any]) -> None:
    with pytest.raises(EngineError, match="calibration data"):
        run_stage(digits["model"], "static_int8", STATIC, StageContext("eager", digits["example"]))


# --------------------------------------------------------------------------- fp16 / bf16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["eager", "graph", "torchscript"])
def test_half_precision_roundtrip(kind: ModelKind, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = MLP(32, 64).eval()
    x = torch.randn(4, 32)
    scheme = "fp16" if dtype == torch.float16 else "bf16"
    upload = {"eager": model, "graph": exported(model, x), "torchscript": torch.jit.script(model)}[kind]
    result = run_stage(upload, scheme, HALF, StageContext(kind, x))

    assert result.kind == kind and result.info["dtype"] == str(dtype).removeprefix("torch.")
    assert {p.dtype for p in result.model.parameters()} == {dtype}
    if kind == "graph":
        loaded, _ = export_roundtrip(result.model, x)
    elif kind == "eager":
        loaded, _ = script_roundtrip(torch.jit.trace(result.model, x))
    else:
        loaded, _ = script_roundtrip(result.model)
    other_batch = torch.randn(9, 32)
    with torch.no_grad():
        output = loaded(other_batch)
        assert output.dtype == torch.float32
        assert sqnr_db(model(other_batch), output) >= (40 if dtype == torch.float16 else 25)


def test_half_precision_keeps_skipped_layers_in_float() -> None:
    torch.manual_seed(0)
    model = MLP(32, 64).eval()
    x = torch.randn(4, 32)
    result = run_stage(model, "fp16", {"skip_layers": ["fc3"]}, StageContext("eager", x))

    assert result.info["skipped_layers"] == ["fc3"] and result.info["quantized_layers"] == ["fc1", "fc2"]
    dtypes = {name: p.dtype for name, p in result.model.named_parameters()}
    assert dtypes["inner.fc1.weight"] == torch.float16 and dtypes["inner.fc3.inner.weight"] == torch.float32
    with torch.no_grad():
        assert sqnr_db(model(x), result.model(x)) >= 40


# --------------------------------------------------------------------------- graph lifting


def test_torch_level_module_names_layers_like_the_source() -> None:
    torch.manual_seed(0)
    model = LeNet().eval()
    x = torch.randn(3, 64)
    lifted = torch_level_module(exported(model, x))

    assert {n for n, m in lifted.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))} == {
        "conv1",
        "conv2",
        "fc1",
        "fc2",
    }
    other_batch = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.allclose(lifted(other_batch), model(other_batch), atol=1e-5)


class ConvBnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2),
            nn.BatchNorm2d(16),
            nn.GELU(),
        )
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def test_static_int8_exported_graph_folds_batch_norm_and_keeps_unknown_ops_float() -> None:
    torch.manual_seed(0)
    model = ConvBnNet().eval()
    for norm in (model.features[1], model.features[4]):
        norm.running_mean.uniform_(-0.2, 0.2)
        norm.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 3, 12, 12)
    ctx = StageContext("graph", x, train_data=Dataset(torch.randn(64, 3, 12, 12)))
    result = run_stage(exported(model, x), "static_int8", {**STATIC, "calibration_batches": 2}, ctx)

    assert result.info["quantized_layers"] == ["features.0", "features.3", "head"]
    assert type(result.model.get_submodule("features.0")).__name__ == "ConvReLU2d"  # conv + bn + relu fused
    loaded, _ = script_roundtrip(torch.jit.trace(result.model, x))
    other_batch = torch.randn(6, 3, 12, 12)
    with torch.no_grad():
        assert sqnr_db(model(other_batch), loaded(other_batch)) >= 20


# --------------------------------------------------------------------------- CUDA (torchao)


def test_cuda_schemes_need_a_gpu(mlp: tuple[nn.Module, torch.Tensor]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(EngineError, match="CUDA only"):
        run_stage(mlp[0], "int8_weight_only", HALF, StageContext("eager", mlp[1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", ["int8_weight_only", "int8_dynamic", "int4_weight_only", "float8"])
def test_cuda_torchao_schemes(scheme: str) -> None:
    if scheme == "float8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs compute capability >= 8.9")
    torch.manual_seed(0)
    model = MLP(256, 1024).eval()
    x = torch.randn(16, 256)
    reference = model(x)
    options = {"skip_layers": ["fc3"], "group_size": 128}
    result = run_stage(model, scheme, options, StageContext("eager", x.cuda(), device=torch.device("cuda")))

    assert result.requires == ["torchao"] and result.preferred_output_format == "exported_program"
    assert result.info["quantized_layers"] == ["fc1", "fc2"] and result.info["skipped_layers"] == ["fc3"]
    inner = result.model.inner
    assert type(inner.fc1.weight) not in (torch.Tensor, nn.Parameter)
    assert type(inner.fc3.weight) in (torch.Tensor, nn.Parameter)
    with torch.no_grad():
        assert sqnr_db(reference, result.model(x.cuda()).cpu()) >= 15
