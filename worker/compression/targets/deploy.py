"""Build a job's artifact for ONNX Runtime or ExecuTorch and measure it in that runtime.

The original model is exported to the same runtime (fp32) and measured there, so size, latency
and speedup compare like with like; fidelity is measured against the float PyTorch model's
outputs on the job's fidelity inputs, the reference every other job uses.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from worker.compression import metrics as measure
from worker.compression.base import Dataset, EngineError
from worker.compression.inputs import Batch, ModelInputs, OutputSelector, Signature

RUNTIME_FORMATS = {"onnxruntime": "onnx", "executorch": "executorch"}
REQUIRES = {"onnxruntime": ["onnxruntime"], "executorch": ["executorch"]}


class RuntimeModel(Protocol):
    def __call__(self, inputs: Batch) -> torch.Tensor: ...

    def timings_ms(self, example: Batch, warmup: int, iterations: int, budget_s: float) -> list[float]: ...


@dataclass
class DeferredQuantization:
    """A quantize stage that the target runtime's own tools apply to the exported float model."""

    scheme: str
    options: dict[str, Any]


@dataclass(frozen=True)
class DeclaredCall:
    """How the job calls the model: its declared inputs (with constants) and the output it scores."""

    signature: Signature | None = None
    output: OutputSelector = None


def _export_float(runtime: str, model: nn.Module, example: Batch, path: Path, call: DeclaredCall) -> None:
    if runtime == "onnxruntime":
        from worker.compression.targets.onnx_runtime import export_onnx

        export_onnx(model, example, path, call.signature, call.output)
    else:
        from worker.compression.targets.executorch import lower_pte

        lower_pte(model, _one_tensor(example, runtime), path, None, None)


def _one_tensor(example: Batch, runtime: str) -> torch.Tensor:
    if isinstance(example, ModelInputs):
        raise EngineError(
            f"the {runtime} target takes a model called with one float tensor; this one takes {example.describe()} "
            "(ONNX Runtime takes named inputs: target.runtime onnxruntime)"
        )
    return example


def _load(runtime: str, path: Path, threads: int) -> RuntimeModel:
    if runtime == "onnxruntime":
        from worker.compression.targets.onnx_runtime import OrtModel

        return OrtModel(path, threads)
    from worker.compression.targets.executorch import PteModel

    return PteModel(path, threads)


def versions(runtime: str) -> dict[str, str]:
    if runtime == "onnxruntime":
        from worker.compression.targets.onnx_runtime import versions as runtime_versions
    else:
        from worker.compression.targets.executorch import versions as runtime_versions
    return runtime_versions()


def predict(model: RuntimeModel, inputs: Batch) -> torch.Tensor:
    """Outputs on `inputs` in batches of the engine's eval batch size, as `metrics.predict` does in torch."""
    chunks = [
        model(inputs[start : start + measure.EVAL_BATCH_SIZE]).float()
        for start in range(0, len(inputs), measure.EVAL_BATCH_SIZE)
    ]
    return torch.cat(chunks)


def latency(model: RuntimeModel, example: Batch) -> dict[str, float]:
    timings = sorted(
        model.timings_ms(example, measure.LATENCY_WARMUP, measure.LATENCY_MAX_ITERATIONS, measure.LATENCY_TIME_BUDGET_S)
    )
    return {"latency_ms_p50": _percentile(timings, 0.5), "latency_ms_p95": _percentile(timings, 0.95)}


def _percentile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return round(sorted_values[index], 4)


def _calibration(train: Dataset | None, example: Batch, options: dict[str, Any]) -> Batch | None:
    from worker.compression.quantization.static import CALIBRATION_BATCH_SIZE, DEFAULT_CALIBRATION_BATCHES

    if train is None or len(train) == 0:
        return None
    # fp16 and the like have no calibration_batches option; static_int8's default is the one
    limit = int(options.get("calibration_batches") or DEFAULT_CALIBRATION_BATCHES) * CALIBRATION_BATCH_SIZE
    inputs = train.inputs[:limit]
    if isinstance(example, ModelInputs) or isinstance(inputs, ModelInputs):
        return inputs  # named inputs, read from the dataset's arrays of the same names and dtypes
    if inputs[0].numel() != example[0].numel():
        raise EngineError(
            f"calibration samples have shape {list(inputs.shape[1:])}, the model takes {list(example.shape[1:])}"
        )
    return inputs.reshape(-1, *example.shape[1:]).to(example.dtype)


def _describe(
    runtime_model: RuntimeModel,
    path: Path,
    example: Batch,
    outputs: torch.Tensor,
    labels: torch.Tensor | None,
    parameters: tuple[int, int],
) -> dict[str, Any]:
    total, nonzero = parameters
    figures: dict[str, Any] = {
        "size_bytes": path.stat().st_size,
        "parameters": total,
        "nonzero_parameters": nonzero,
        "sparsity": round(1 - nonzero / total, 6) if total else 0.0,
    }
    figures["accuracy"] = measure.accuracy(outputs, labels)
    return figures


def finish_for_target(
    *,
    runtime: str,
    original_model: nn.Module,
    working: nn.Module,
    quantization: DeferredQuantization | None,
    example: Batch,
    threads: int,
    artifact: Path,
    fid_inputs: Batch,
    fid_labels: torch.Tensor | None,
    reference: torch.Tensor | measure.Outputs,
    original_parameters: tuple[int, int],
    parameters: tuple[int, int],
    train: Dataset | None,
    progress: Callable[[float, str], None],
    call: DeclaredCall | None = None,
) -> dict[str, Any]:
    """Write the artifact for `runtime` and return (original figures, compressed figures, outputs, stage info).

    `call` says how the model is called when it takes more than one float tensor (named inputs,
    constant arguments, the scored output); ONNX Runtime takes such models, ExecuTorch does not.
    """
    call = call or DeclaredCall()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        original_file = folder / "original"
        progress(0.90, f"exporting the original to {runtime}")
        _export_float(runtime, original_model, example, original_file, call)
        original_runtime = _load(runtime, original_file, threads)
        original_outputs = predict(original_runtime, fid_inputs)
        original = _describe(
            original_runtime, original_file, example, original_outputs, fid_labels, original_parameters
        )
        original["measured_in"] = runtime
        original["fidelity_to_torch"] = measure.fidelity(reference, original_outputs)

        float_file = original_file
        if working is not original_model:
            float_file = folder / "compressed-float"
            progress(0.92, f"exporting the compressed model to {runtime}")
            _export_float(runtime, working, example, float_file, call)
        info: dict[str, Any] = {}
        if quantization is None:
            shutil.copyfile(float_file, artifact)
        else:
            progress(0.94, f"quantizing with {runtime}'s tools ({quantization.scheme})")
            calibration = _calibration(train, example, quantization.options)
            info = _quantize(runtime, quantization, working, example, float_file, artifact, calibration)
        progress(0.96, f"measuring the artifact in {runtime}")
        served = _load(runtime, artifact, threads)
        outputs = predict(served, fid_inputs)
        compressed = _describe(served, artifact, example, outputs, fid_labels, parameters)
        compressed["measured_in"] = runtime
        # both loaded side by side, so their latencies are measured interleaved in the same runtime
        speed = measure.compare_latency(original_runtime, served, example, threads)
        original.update(speed["original"])
        compressed.update(speed["compressed"])
        del original_runtime
    return {
        "original": original,
        "compressed": compressed,
        "outputs": outputs,
        "quantization_info": info,
        "versions": versions(runtime),
        "speed": speed,
    }


def _quantize(
    runtime: str,
    quantization: DeferredQuantization,
    working: nn.Module,
    example: Batch,
    float_file: Path,
    artifact: Path,
    calibration: Batch | None,
) -> dict[str, Any]:
    if runtime == "onnxruntime":
        from worker.compression.targets.onnx_runtime import quantize

        return quantize(float_file, artifact, quantization.scheme, calibration, quantization.options)
    from worker.compression.targets.executorch import lower_pte

    assert calibration is None or isinstance(calibration, torch.Tensor)  # _one_tensor refused named inputs
    return lower_pte(working, _one_tensor(example, runtime), artifact, quantization.scheme, calibration)
