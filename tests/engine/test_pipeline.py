"""The whole engine in one call: stages chain, every stage is recorded, numbers are honest."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import accuracy, digits_split, mlp, npz_bytes, torchscript_bytes, train
from worker.compression.base import EngineError
from worker.compression.pipeline import JobRequest, build_metrics, run_job

pytestmark = pytest.mark.usefixtures("one_thread")


def request(tmp_path: Path, model_bytes: bytes, stages: list[dict], **extra) -> JobRequest:  # type: ignore[no-untyped-def]
    source = tmp_path / "model.pt"
    source.write_bytes(model_bytes)
    return JobRequest.from_dict({"model": {"path": str(source), "format": "torchscript"}, "stages": stages,
                                 "artifact_path": str(tmp_path / "artifact"), **extra})


def test_prune_then_quantize_records_each_stage_and_measures_the_download(tmp_path: Path) -> None:
    x_train, x_test, y_train, y_test = digits_split()
    model = train(mlp((64, 128, 10)), x_train, y_train, epochs=10)
    eval_path = tmp_path / "eval.npz"
    eval_path.write_bytes(npz_bytes(x_test, y_test))
    stages = [{"method": "prune", "scheme": "l1_unstructured",
               "options": {"amount": 0.5, "layers": None, "prune_classifier": False, "schedule": None, "train": None}},
              {"method": "quantize", "scheme": "dynamic_int8", "options": {"skip_layers": [], "keep_first_last_float": False}}]
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
        predictions = torch.cat([loaded(torch.tensor(x_test[i:i + batch])).argmax(1)
                                 for i in range(0, len(x_test), batch)])
    measured = float((predictions == torch.tensor(y_test)).float().mean())
    assert metrics["compressed"]["accuracy"] == pytest.approx(measured, abs=1e-6)
    assert metrics["original"]["accuracy"] == pytest.approx(accuracy(model, x_test, y_test), abs=1e-6)


def test_a_model_that_does_not_run_on_the_input_says_so(tmp_path: Path) -> None:
    stages = [{"method": "quantize", "scheme": "dynamic_int8", "options": {"skip_layers": []}}]
    with pytest.raises(EngineError, match=r"shape \[2, 5\]"):
        run_job(request(tmp_path, torchscript_bytes(mlp((8, 4))), stages, example_input_shape=[2, 5]))


def test_metrics_say_when_the_result_is_not_smaller_or_not_faster() -> None:
    original = {"size_bytes": 1000, "latency_ms_p50": 1.0}
    bigger_and_slower = {"size_bytes": 1200, "latency_ms_p50": 2.0}
    metrics = build_metrics(original, bigger_and_slower, {}, [], device=torch.device("cpu"), batch_size=4, threads=1)
    assert metrics["compression_ratio"] == pytest.approx(1000 / 1200, rel=1e-3)
    assert metrics["speedup"] == 0.5
    assert any("not smaller" in w for w in metrics["warnings"])
    assert any("slower" in w for w in metrics["warnings"])
    better = build_metrics(original, {"size_bytes": 250, "latency_ms_p50": 0.5}, {}, [],
                           device=torch.device("cpu"), batch_size=4, threads=1)
    assert better["warnings"] == [] and np.isclose(better["compression_ratio"], 4.0)
