"""Models as people upload them: several named inputs, constant arguments, tuple / dict outputs,
TorchScript reaching eager methods through torch's TorchScript -> exported program converter.

Small, seeded, random-init models; every figure the engine reports is checked against the
test's own run of the artifact it wrote.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from worker.compression.base import EngineError
from worker.compression.inputs import ModelInputs, Signature, call_model, export_program, make_example
from worker.compression.io import load_artifact, load_dataset
from worker.compression.pipeline import JobRequest, ModelRef, StageSpec, run_job

VOCAB, SEQ = 200, 16


def sqnr_db(reference: torch.Tensor, output: torch.Tensor) -> float:
    reference, output = reference.float(), output.float()
    noise = (reference - output).pow(2).mean()
    return float(10 * torch.log10(reference.pow(2).mean() / noise)) if float(noise) else math.inf


class TinyEncoder(nn.Module):
    """BERT-shaped: (input_ids, attention_mask) -> (hidden states, pooled), like a Hugging Face encoder."""

    def __init__(self, hidden: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, hidden)
        self.position = nn.Embedding(SEQ * 4, hidden)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(hidden, 4, 4 * hidden, dropout=0.0, batch_first=True) for _ in range(layers)
        )
        self.pool = nn.Linear(hidden, hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        h = self.embed(input_ids) + self.position(positions)
        pad = attention_mask == 0
        for block in self.blocks:
            h = block(h, src_key_padding_mask=pad)
        return h, torch.tanh(self.pool(h[:, 0]))


class SmallResNet(nn.Module):
    def __init__(self, width: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.c1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(width)
        self.c2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(width)
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 1, stride=2, bias=False), nn.BatchNorm2d(2 * width))
        self.c3 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.b3 = nn.BatchNorm2d(2 * width)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))
        x = F.relu(self.down(x) + self.b3(self.c3(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Audio(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(64, 32)
        self.l2 = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor, sr: int) -> torch.Tensor:
        h = torch.relu(self.l1(x))
        return torch.sigmoid(self.l2(h)) if sr == 16000 else torch.sigmoid(-self.l2(h))


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    model = SmallResNet()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


TOKEN_INPUTS = [
    {"name": "input_ids", "shape": [1, SEQ], "dtype": "int64", "low": 0, "high": VOCAB, "dynamic": [0, 1]},
    {"name": "attention_mask", "shape": [1, SEQ], "dtype": "int64", "low": 1, "high": 2, "dynamic": [0, 1]},
]


def _job(tmp_path: Path, model_path: Path, model_format: str, stages: list[StageSpec], **fields) -> tuple[dict, Path]:
    artifact = tmp_path / "artifact.bin"
    request = JobRequest(
        model=ModelRef(str(model_path), model_format), stages=stages, artifact_path=str(artifact), **fields
    )
    return run_job(request), artifact


def test_signature_examples_follow_the_declaration() -> None:
    signature = Signature.from_request(TOKEN_INPUTS, None, {"sr": 16000})
    assert signature is not None
    example = make_example(signature, batch=3, seed=1)
    assert isinstance(example, ModelInputs)
    ids, mask = example.tensors
    assert ids.shape == (3, SEQ) and ids.dtype == torch.int64 and 0 <= int(ids.min()) and int(ids.max()) < VOCAB
    assert bool((mask == 1).all()) and example.kwargs == {"sr": 16000}
    assert len(example[1:]) == 2 and example[1:].tensors[0].shape == (2, SEQ)
    shorthand = Signature.from_request(None, [2, 5])
    assert shorthand is not None and isinstance(make_example(shorthand), torch.Tensor)


def test_export_keeps_declared_dimensions_dynamic() -> None:
    """No specialisation on the example: the program runs at other batch sizes and sequence lengths."""
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    signature = Signature.from_request(TOKEN_INPUTS, None)
    assert signature is not None
    program = export_program(model, signature, make_example(signature, seed=0))
    other = make_example(Signature.from_request([dict(spec, shape=[5, 9]) for spec in TOKEN_INPUTS], None), seed=3)  # type: ignore[arg-type]
    with torch.no_grad():
        expected, got = call_model(model, other), call_model(program.module(), other)
    assert got[0].shape == (5, 9, 64)
    assert torch.allclose(expected[0], got[0], atol=1e-4)


def test_token_model_dynamic_int8_scores_every_output(tmp_path: Path) -> None:
    """A TorchScript BERT-like encoder with (ids, mask) -> (hidden, pooled) through dynamic int8."""
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    ids = torch.randint(0, VOCAB, (2, SEQ))
    mask = torch.ones(2, SEQ, dtype=torch.long)
    path = tmp_path / "encoder.pt"
    torch.jit.save(torch.jit.trace(model, (ids, mask), check_trace=False), str(path))
    np.savez(
        tmp_path / "tokens.npz",
        input_ids=torch.randint(0, VOCAB, (48, SEQ)).numpy(),
        attention_mask=np.ones((48, SEQ), dtype=np.int64),
    )
    result, artifact = _job(
        tmp_path,
        path,
        "torchscript",
        [StageSpec("quantize", "dynamic_int8")],
        inputs=TOKEN_INPUTS,
        dataset_path=str(tmp_path / "tokens.npz"),
    )
    metrics = result["metrics"]
    fidelity = metrics["fidelity"]
    assert [row["output"] for row in fidelity["outputs"]] == ["0", "1"]
    quantized = load_artifact(artifact, result["artifact_format"])
    data = load_dataset(tmp_path / "tokens.npz", Signature.from_request(TOKEN_INPUTS, None))
    with torch.no_grad():
        reference, output = call_model(model, data.inputs), call_model(quantized, data.inputs)
    measured = sqnr_db(reference[0], output[0])
    assert measured >= 30, measured
    reported = next(row["sqnr_db"] for row in fidelity["outputs"] if row["output"] == "0")
    assert abs(reported - measured) < 0.5
    assert metrics["compressed"]["size_bytes"] == artifact.stat().st_size


def test_torchscript_resnet_static_int8_through_the_converter(tmp_path: Path) -> None:
    model = _resnet()
    path = tmp_path / "resnet.pt"
    torch.jit.save(torch.jit.trace(model, torch.randn(1, 3, 32, 32)), str(path))
    np.savez(tmp_path / "images.npz", inputs=torch.randn(64, 3, 32, 32).numpy())
    result, artifact = _job(
        tmp_path,
        path,
        "torchscript",
        [StageSpec("quantize", "static_int8")],
        example_input_shape=[1, 3, 32, 32],
        dataset_path=str(tmp_path / "images.npz"),
    )
    quantized = load_artifact(artifact, result["artifact_format"])
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        measured = sqnr_db(model(x), quantized(x))
    assert measured >= 20, measured
    assert path.stat().st_size / artifact.stat().st_size >= 3
    assert result["metrics"]["stages"][0]["info"]["quantized_layers"]


def test_torchscript_resnet_loses_channels_with_ln_structured(tmp_path: Path) -> None:
    model = _resnet()
    path = tmp_path / "resnet.pt"
    torch.jit.save(torch.jit.trace(model, torch.randn(1, 3, 32, 32)), str(path))
    result, artifact = _job(
        tmp_path,
        path,
        "torchscript",
        [StageSpec("prune", "ln_structured", {"amount": 0.3})],
        example_input_shape=[1, 3, 32, 32],
    )
    pruned = load_artifact(artifact, result["artifact_format"])
    assert isinstance(pruned, nn.Module)
    before = sum(v.numel() for v in model.state_dict().values())
    after = sum(v.numel() for v in pruned.state_dict().values())
    assert after <= 0.8 * before
    with torch.no_grad():
        assert pruned(torch.randn(3, 3, 32, 32)).shape == (3, 10)  # any batch, not the example's


def test_constant_arguments_reach_every_call(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Audio().eval()
    path = tmp_path / "audio.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    result, artifact = _job(
        tmp_path,
        path,
        "torchscript",
        [StageSpec("prune", "l1_unstructured", {"amount": 0.3})],
        inputs=[{"name": "x", "shape": [1, 64], "dtype": "float32", "dynamic": [0]}],
        forward_kwargs={"sr": 16000},
        output_format="torchscript",
    )
    pruned = load_artifact(artifact, "torchscript")
    x = torch.randn(8, 64)
    with torch.no_grad():
        assert torch.allclose(pruned(x, 16000), pruned(x, 16000))
        reported = result["metrics"]["fidelity"]["sqnr_db"]
        # the scripted model keeps its branch on sr; the figures were measured on sr=16000
        assert reported is not None and reported > 0
        assert not torch.allclose(pruned(x, 16000), pruned(x, 8000))
    weights = pruned.state_dict()["l1.weight"]
    assert 0.28 <= float((weights == 0).float().mean()) <= 0.32


def test_a_missing_input_array_is_named(tmp_path: Path) -> None:
    np.savez(tmp_path / "tokens.npz", input_ids=np.zeros((4, SEQ), dtype=np.int64))
    with pytest.raises(EngineError, match="attention_mask"):
        load_dataset(tmp_path / "tokens.npz", Signature.from_request(TOKEN_INPUTS, None))
