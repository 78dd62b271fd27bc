"""The deep_compression container: lossless round trip, and the digits MLP >= 20x smaller within 1 point of top-1,
measured by loading the file with the documented loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from modelpress.catalog import JobFacts, expand_preset, validate_stages
from modelpress.deep_compression_format import decode, describe, encode, huffman_decode, huffman_encode, load_state_dict
from tests.helpers import accuracy, digits_split, mlp, train
from worker.compression.pipeline import JobRequest, run_job
from worker.compression.registry import build_architecture

pytestmark = pytest.mark.usefixtures("one_thread")


def test_huffman_round_trip_and_skewed_symbols_cost_fewer_bits() -> None:
    rng = np.random.default_rng(0)
    symbols = rng.choice(32, size=5000, p=np.r_[0.5, np.full(31, 0.5 / 31)])
    table, stream = huffman_encode(symbols, 32)
    assert np.array_equal(huffman_decode(table, stream, 32, len(symbols)), symbols)
    assert 8 * len(stream) < 5 * len(symbols) * 0.75  # well under the fixed 5 bits a symbol
    one = np.zeros(7, dtype=np.int64)  # a single symbol still gets a 1-bit code
    assert np.array_equal(huffman_decode(*huffman_encode(one, 4), 4, 7), one)


def test_container_is_lossless_for_every_tensor_kind() -> None:
    rng = np.random.default_rng(1)
    codebook = np.linspace(-1, 1, 16).astype(np.float16).astype(np.float32)
    sparse = np.where(rng.random((300, 64)) < 0.1, codebook[rng.integers(0, 16, (300, 64))], 0).astype(np.float32)
    sparse[0, :] = 0  # long runs of zeros need filler entries in the relative index
    state = {
        "a.weight": sparse,
        "a.bias": rng.normal(size=300).astype(np.float32),
        "b.weight": rng.normal(size=(10, 10)).astype(np.float32),
        "steps": np.arange(3),
        "half.bias": np.array([0.5, -2.0], dtype=np.float32),
    }
    data, _ = encode(state)
    decoded = decode(data)
    for name, array in state.items():
        assert decoded[name].shape == array.shape and np.array_equal(decoded[name].astype(array.dtype), array), name
    kinds = {row["name"]: (row["kind"], row.get("dtype")) for row in describe(data)["tensors"]}
    assert kinds == {
        "a.weight": ("codebook", None),
        "a.bias": ("raw", "f4"),
        "b.weight": ("raw", "f4"),
        "steps": ("raw", "i8"),
        "half.bias": ("raw", "f2"),
    }
    with pytest.raises(ValueError, match="trailing"):
        decode(data + b"x")


def test_deep_compression_preset_on_digits_is_20x_smaller_within_one_point(tmp_path: Path) -> None:
    x_train, x_test, y_train, y_test = digits_split()
    model = train(mlp(), x_train, y_train)
    float_path = tmp_path / "mlp.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(float_path))
    np.savez(tmp_path / "train.npz", inputs=x_train, labels=y_train)
    np.savez(tmp_path / "test.npz", inputs=x_test, labels=y_test)
    facts = JobFacts(model_format="safetensors", has_dataset=True, dataset_has_labels=True, eval_has_labels=True)
    stages = validate_stages(expand_preset("deep-compression"), facts)
    artifact = tmp_path / "model.mpdc"
    result = run_job(
        JobRequest.from_dict(
            {
                "model": {
                    "path": str(float_path),
                    "format": "safetensors",
                    "architecture": {"name": "mlp", "kwargs": {"widths": [64, 300, 100, 10]}},
                },
                "stages": [{"method": s.spec.method, "scheme": s.spec.name, "options": s.options} for s in stages],
                "artifact_path": str(artifact),
                "dataset_path": str(tmp_path / "train.npz"),
                "eval_dataset_path": str(tmp_path / "test.npz"),
            }
        )
    )
    assert result["artifact_format"] == "deep_compression"
    assert artifact.read_bytes()[:4] == b"MPDC"

    # the README's loader, into a fresh copy of the architecture the job named
    restored = build_architecture("mlp", {"widths": [64, 300, 100, 10]})
    restored.load_state_dict(load_state_dict(artifact))
    restored.eval()
    ratio = float_path.stat().st_size / artifact.stat().st_size
    float_top1, compressed_top1 = accuracy(model, x_test, y_test), accuracy(restored, x_test, y_test)
    assert ratio >= 20, f"only {ratio:.1f}x smaller"
    assert float_top1 - compressed_top1 <= 0.01, f"top-1 {float_top1:.4f} -> {compressed_top1:.4f}"
    # every layer keeps at most 2^5 distinct nonzero values and its pruned zeros
    for layer in (restored.net[0], restored.net[2], restored.net[4]):
        assert torch.unique(layer.weight[layer.weight != 0]).numel() <= 32
        assert float((layer.weight == 0).float().mean()) > 0.5

    metrics = result["metrics"]
    assert metrics["compressed"]["size_bytes"] == artifact.stat().st_size
    assert metrics["compression_ratio"] == pytest.approx(ratio, rel=1e-3)
    assert metrics["original"]["accuracy"] == pytest.approx(float_top1, abs=1e-6)
    assert metrics["compressed"]["accuracy"] == pytest.approx(compressed_top1, abs=1e-6)
    container = metrics["stages"][-1]["info"]["container"]
    parameters = sum(p.numel() for p in restored.parameters())
    assert container["bits_per_weight"] == pytest.approx(8 * artifact.stat().st_size / parameters, abs=1e-3)
    assert container["bits_per_weight"] < 32 / 20


def test_torchscript_output_stays_available_on_request(tmp_path: Path) -> None:
    x_train, x_test, y_train, y_test = digits_split()
    model = mlp()
    with torch.no_grad():
        for layer in (model[0], model[2], model[4]):
            layer.weight.mul_(layer.weight.abs() > layer.weight.abs().quantile(0.9))
    float_path = tmp_path / "mlp.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(float_path))
    np.savez(tmp_path / "test.npz", inputs=x_test, labels=y_test)
    result = run_job(
        JobRequest.from_dict(
            {
                "model": {
                    "path": str(float_path),
                    "format": "safetensors",
                    "architecture": {"name": "mlp", "kwargs": {"widths": [64, 300, 100, 10]}},
                },
                "stages": [{"method": "encode", "scheme": "codebook", "options": {"bits": 5}}],
                "artifact_path": str(tmp_path / "model.pt"),
                "eval_dataset_path": str(tmp_path / "test.npz"),
                "output_format": "torchscript",
            }
        )
    )
    assert result["artifact_format"] == "torchscript"
    loaded = torch.jit.load(str(tmp_path / "model.pt"))
    assert getattr(loaded.net, "0").original_name == "CodebookLinear"
