"""The search tries what works: static int8 and structured pruning next to the old candidates, each
measured (size, interleaved latency with spread, fidelity), in PyTorch or in ONNX Runtime.

Each chosen artifact is built by the engine's `run_job`, then loaded here independently and checked
against what the job reported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.helpers import digits_split, sqnr_db, train
from tests.zoo import build
from worker.compression.base import Dataset, StageContext
from worker.compression.pipeline import JobRequest, run_job
from worker.compression.registry import LeNet5
from worker.compression.search import run_stage


def _never_slower_or_bigger(info: dict[str, Any]) -> None:
    """Every candidate that met the bar is smaller than the original and not measurably slower."""
    for trial in info["trials"]:
        if trial["status"] in ("met", "missed"):
            assert trial["speed_verdict"] in ("faster", "slower", "no measurable change")
            assert trial["speedup_low"] <= trial["speedup"] <= trial["speedup_high"]
        if trial["status"] == "met":
            assert trial["size_bytes"] < info["original_size_bytes"]
            assert trial["speed_verdict"] != "slower"


def _resnet_job(
    tmp_path: Path, runtime: str, dataset: bool, trials: int
) -> tuple[torch.nn.Module, dict[str, Any], Path]:
    entry = build("resnet")
    model_path = entry.save_exported(tmp_path / "resnet.pt2")
    suffix = "onnx" if runtime == "onnxruntime" else "bin"
    request: dict[str, Any] = {
        "model": {"path": str(model_path), "format": "exported_program"},
        "stages": [
            {"method": "search", "scheme": "accuracy_aware", "options": {"min_sqnr_db": 20.0, "max_trials": trials}}
        ],
        "artifact_path": str(tmp_path / f"artifact.{suffix}"),
        "example_input_shape": [1, 3, 32, 32],
        "runtime": runtime,
        "threads": 1,
    }
    if dataset:
        generator = torch.Generator().manual_seed(3)
        np.savez(tmp_path / "train.npz", inputs=torch.randn(64, 3, 32, 32, generator=generator).numpy())
        request["dataset_path"] = str(tmp_path / "train.npz")
    result = run_job(JobRequest.from_dict(request))
    return entry.model, result, Path(request["artifact_path"])


def test_search_picks_static_int8_for_the_resnet_and_the_artifact_is_as_reported(
    tmp_path: Path, one_thread: None
) -> None:
    model, result, artifact = _resnet_job(tmp_path, "torch", dataset=False, trials=3)
    metrics = result["metrics"]
    info = metrics["stages"][0]["info"]
    _never_slower_or_bigger(info)
    chosen = info["chosen"]
    # no dataset: static int8 calibrates on inputs drawn from the declared shape, and says so
    assert chosen["candidate"] == "static_int8 (synthetic calibration)", info["trials"]
    assert chosen["calibration"] == "synthetic" and info["calibration"] == "synthetic"
    assert any("synthetic" in warning for warning in metrics["warnings"])
    dynamic = next(t for t in info["trials"] if t["candidate"] == "dynamic_int8")
    assert chosen["size_bytes"] < dynamic["size_bytes"]  # the conv layers only static int8 reaches

    # the artifact, loaded on its own: its size is the reported one, smaller than the original's
    assert result["artifact_format"] == "torchscript"
    assert artifact.stat().st_size == metrics["compressed"]["size_bytes"]
    assert metrics["compressed"]["size_bytes"] < metrics["original"]["size_bytes"] / 2
    loaded = torch.jit.load(str(artifact))
    inputs = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        measured = sqnr_db(model(inputs), loaded(inputs))
    assert measured >= 20.0
    assert metrics["speed_verdict"] != "slower"


@pytest.fixture(scope="module")
def digits_lenet() -> tuple[torch.nn.Module, tuple[np.ndarray, ...]]:
    data = digits_split()
    torch.manual_seed(0)
    return train(LeNet5(), data[0], data[2], epochs=5), data


def test_search_on_digits_tries_static_int8_on_the_dataset_and_fine_tuned_structured_pruning(
    digits_lenet: Any, one_thread: None
) -> None:
    model, (x_train, x_test, y_train, y_test) = digits_lenet
    ctx = StageContext(
        kind="eager",
        example_input=torch.tensor(x_test[:1]),
        train_data=Dataset(torch.tensor(x_train), torch.tensor(y_train)),
        eval_data=Dataset(torch.tensor(x_test), torch.tensor(y_test)),
    )
    options = {"max_accuracy_drop": 0.03, "max_trials": 3, "train": {"epochs": 1}}
    result = run_stage(model, "accuracy_aware", options, ctx)
    info = result.info
    _never_slower_or_bigger(info)
    by_name = {t["candidate"]: t for t in info["trials"]}
    static = by_name["static_int8 (dataset calibration)"]
    assert static["calibration"] == "dataset" and static["status"] in ("met", "missed")
    structured = [t for t in info["trials"] if t["candidate"].startswith("ln_structured")]
    assert structured and all(t["stages"][0].get("train") == {"epochs": 1} for t in structured)
    # which candidates meet the bar depends on this CPU's int8 kernels (static int8 of this small LeNet is
    # faster at batch 1 on some x86 CPUs, slower on others); the choice among them does not
    assert info["result"] == "met"
    met = [t for t in info["trials"] if t["status"] == "met"]
    assert info["chosen"]["size_bytes"] == min(t["size_bytes"] for t in met)
    # independent: the returned model's accuracy on the held-out digits
    with torch.no_grad():
        predicted = result.model(torch.tensor(x_test)).argmax(1).numpy()
    assert abs(float((predicted == y_test).mean()) - info["chosen"]["accuracy"]) < 1e-6


def test_search_for_onnxruntime_chooses_among_the_runtimes_schemes_measured_in_ort(
    tmp_path: Path, one_thread: None
) -> None:
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    model, result, artifact = _resnet_job(tmp_path, "onnxruntime", dataset=False, trials=2)
    metrics = result["metrics"]
    info = metrics["stages"][0]["info"]
    assert info["runtime"] == "onnxruntime" and metrics["runtime"] == "onnxruntime"
    _never_slower_or_bigger(info)
    assert info["original_size_bytes"] == metrics["original"]["size_bytes"]  # the original exported to ORT
    assert info["result"] == "met", info["trials"]
    chosen = info["chosen"]
    # ORT's own static QDQ int8, calibrated on inputs drawn from the declared shape (the job has no dataset)
    assert chosen["candidate"] == "onnxruntime static_int8 (synthetic calibration)", info["trials"]
    assert info["runtime_quantization"]["scheme"] == "static_int8" and info["calibration"] == "synthetic"
    assert metrics["stages"][-1]["info"]["calibration_samples"] > 0  # the delivered file was calibrated too
    assert any("synthetic" in warning for warning in metrics["warnings"])
    # the delivered file, loaded in ORT here: the reported size, smaller than the ORT original, faithful
    assert result["artifact_format"] == "onnx"
    assert artifact.stat().st_size == metrics["compressed"]["size_bytes"] < metrics["original"]["size_bytes"]
    session = ort.InferenceSession(str(artifact), providers=["CPUExecutionProvider"])
    inputs = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    outputs = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0])
    with torch.no_grad():
        assert sqnr_db(model(inputs), outputs) >= 15.0
    assert metrics["speed_verdict"] != "slower"
