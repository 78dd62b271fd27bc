"""The whole engine in one call: stages chain, every stage is recorded, numbers are honest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import accuracy, digits_split, mlp, npz_bytes, torchscript_bytes, train
from worker.compression.base import EngineError
from worker.compression.metrics import SPEED_MIN_ROUNDS, compare_latency, speed_verdict
from worker.compression.pipeline import JobRequest, build_metrics, run_job

pytestmark = pytest.mark.usefixtures("one_thread")


def request(tmp_path: Path, model_bytes: bytes, stages: list[dict], **extra) -> JobRequest:  # type: ignore[no-untyped-def]
    source = tmp_path / "model.pt"
    source.write_bytes(model_bytes)
    return JobRequest.from_dict(
        {
            "model": {"path": str(source), "format": "torchscript"},
            "stages": stages,
            "artifact_path": str(tmp_path / "artifact"),
            **extra,
        }
    )


def test_prune_then_quantize_records_each_stage_and_measures_the_download(tmp_path: Path) -> None:
    x_train, x_test, y_train, y_test = digits_split()
    model = train(mlp((64, 128, 10)), x_train, y_train, epochs=10)
    eval_path = tmp_path / "eval.npz"
    eval_path.write_bytes(npz_bytes(x_test, y_test))
    stages = [
        {
            "method": "prune",
            "scheme": "l1_unstructured",
            "options": {"amount": 0.5, "layers": None, "prune_classifier": False, "schedule": None, "train": None},
        },
        {
            "method": "quantize",
            "scheme": "dynamic_int8",
            "options": {"skip_layers": [], "keep_first_last_float": False},
        },
    ]
    result = run_job(request(tmp_path, torchscript_bytes(model), stages, eval_dataset_path=str(eval_path)))
    metrics = result["metrics"]
    assert [s["method"] for s in metrics["stages"]] == ["prune", "quantize"]
    assert metrics["stages"][0]["sparsity"] > 0.3  # half of the hidden layer's weights
    # the quantize stage keeps the float count: packed int8 weights are not parameters
    assert metrics["stages"][1]["parameters"] == metrics["stages"][0]["parameters"]
    artifact = tmp_path / "artifact"
    assert result["artifact_format"] == "torchscript"
    assert metrics["compressed"]["size_bytes"] == artifact.stat().st_size
    loaded = torch.jit.load(str(artifact))
    # int8 dynamic quantization scales activations per batch: measure with the reported eval batch size
    batch = metrics["eval_batch_size"]
    with torch.no_grad():
        predictions = torch.cat(
            [loaded(torch.tensor(x_test[i : i + batch])).argmax(1) for i in range(0, len(x_test), batch)]
        )
    measured = float((predictions == torch.tensor(y_test)).float().mean())
    assert metrics["compressed"]["accuracy"] == pytest.approx(measured, abs=1e-6)
    assert metrics["original"]["accuracy"] == pytest.approx(accuracy(model, x_test, y_test), abs=1e-6)


def test_a_model_that_does_not_run_on_the_input_says_so(tmp_path: Path) -> None:
    stages = [{"method": "quantize", "scheme": "dynamic_int8", "options": {"skip_layers": []}}]
    with pytest.raises(EngineError, match=r"shape \[2, 5\]"):
        run_job(request(tmp_path, torchscript_bytes(mlp((8, 4))), stages, example_input_shape=[2, 5]))


def _speed(speedup: float, low: float, high: float, verdict: str) -> dict:
    return {
        "speedup": speedup,
        "speedup_low": low,
        "speedup_high": high,
        "speed_verdict": verdict,
        "speed_rounds": 10,
        "speed_calls_per_round": 5,
    }


def test_metrics_say_when_the_result_is_not_smaller_or_not_faster() -> None:
    original = {"size_bytes": 1000, "latency_ms_p50": 1.0}
    bigger_and_slower = {"size_bytes": 1200, "latency_ms_p50": 2.0}
    metrics = build_metrics(
        original,
        bigger_and_slower,
        {},
        [],
        device=torch.device("cpu"),
        batch_size=4,
        threads=1,
        speed=_speed(0.5, 0.45, 0.55, "slower"),
    )
    assert metrics["compression_ratio"] == pytest.approx(1000 / 1200, rel=1e-3)
    assert metrics["speedup"] == 0.5 and metrics["speed_verdict"] == "slower"
    assert (metrics["speedup_low"], metrics["speedup_high"]) == (0.45, 0.55)
    assert any("not smaller" in w for w in metrics["warnings"])
    assert any("slower" in w for w in metrics["warnings"])
    better = build_metrics(
        original,
        {"size_bytes": 250, "latency_ms_p50": 0.5},
        {},
        [],
        device=torch.device("cpu"),
        batch_size=4,
        threads=1,
        speed=_speed(2.0, 1.9, 2.1, "faster"),
    )
    assert better["warnings"] == [] and np.isclose(better["compression_ratio"], 4.0)
    # batch size and threads stay recorded next to the figure
    assert (better["batch_size"], better["threads"]) == (4, 1)


def test_the_speed_verdict_needs_the_whole_interval_on_one_side_and_a_real_effect() -> None:
    assert speed_verdict(1.8, 1.6, 2.0) == "faster"
    assert speed_verdict(0.5, 0.45, 0.56) == "slower"
    assert speed_verdict(1.27, 0.9, 1.5) == "no measurable change"  # the spread reaches 1
    assert speed_verdict(1.02, 1.01, 1.03) == "no measurable change"  # consistent but below the minimum effect


def test_the_same_model_against_itself_is_no_measurable_change() -> None:
    model = mlp((64, 300, 100, 10)).eval()
    speed = compare_latency(model, model, torch.randn(64, 64), threads=1)
    assert speed["speed_verdict"] == "no measurable change", speed
    assert speed["speedup_low"] <= speed["speedup"] <= speed["speedup_high"]
    assert speed["speed_rounds"] >= SPEED_MIN_ROUNDS


def test_a_compressed_form_that_computes_the_same_is_reported_as_no_change(tmp_path: Path) -> None:
    # the case: an 80%-pruned MLP delivered dense runs the same dense matrix products as the original
    stages = [
        {
            "method": "prune",
            "scheme": "l1_unstructured",
            "options": {"amount": 0.8, "layers": None, "prune_classifier": False, "schedule": None, "train": None},
        }
    ]
    metrics = run_job(
        request(tmp_path, torchscript_bytes(mlp((64, 300, 100, 10))), stages, example_input_shape=[64, 64])
    )["metrics"]
    assert metrics["compressed"]["sparsity"] > 0.5
    assert metrics["speed_verdict"] == "no measurable change", {
        k: metrics[k] for k in ("speedup", "speedup_low", "speedup_high")
    }
    assert metrics["speedup_low"] <= 1.0 <= metrics["speedup_high"] or abs(metrics["speedup"] - 1) < 0.05
    assert not any("slower" in w for w in metrics["warnings"])
    assert metrics["batch_size"] == 64 and metrics["threads"] == 1


def test_an_int8_model_that_is_really_faster_is_reported_faster(tmp_path: Path) -> None:
    # wide enough layers that int8 kernels win by far more than the noise, small enough to stay quick
    model = mlp((1024, 1024, 1024, 10)).eval()
    stages = [
        {"method": "quantize", "scheme": "dynamic_int8", "options": {"skip_layers": [], "keep_first_last_float": False}}
    ]
    metrics = run_job(request(tmp_path, torchscript_bytes(model), stages, example_input_shape=[64, 1024]))["metrics"]
    assert metrics["speed_verdict"] == "faster", {k: metrics[k] for k in ("speedup", "speedup_low", "speedup_high")}
    assert metrics["speedup_low"] > 1.0
    # independently: time both models here, interleaved, and find the artifact faster too
    loaded = torch.jit.load(str(tmp_path / "artifact"))
    example = torch.randn(64, 1024)
    assert compare_latency(model, loaded, example, threads=1)["speedup"] > 1.0
