"""Search candidates built and measured in the runtime that will serve them (ONNX Runtime).

The original is exported to the runtime once and kept loaded; each candidate's float model is
exported, quantized by the runtime's own tools when the candidate says so, loaded in the
runtime, run on the search's fidelity inputs, and timed interleaved with the loaded original in
the same runtime, so "smaller" and "faster" compare like with like.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker.compression import breadcrumbs
from worker.compression import metrics as measure
from worker.compression.base import Dataset, EngineError, StageContext
from worker.compression.inputs import Batch, Signature
from worker.compression.search_candidates import CANDIDATE_SPEED_BUDGET_S, synthetic_calibration
from worker.compression.targets.deploy import (
    DeclaredCall,
    DeferredQuantization,
    _calibration,
    _export_float,
    _load,
    _quantize,
    predict,
)

SEARCHABLE_RUNTIMES = ("onnxruntime",)


class RuntimeBench:
    """The original loaded in `ctx.runtime`, and a scratch folder for the candidates' files."""

    def __init__(self, original: nn.Module, ctx: StageContext) -> None:
        if ctx.runtime not in SEARCHABLE_RUNTIMES:
            raise EngineError(f"the search runs in {list(SEARCHABLE_RUNTIMES)} or torch, not in {ctx.runtime!r}")
        if not isinstance(ctx.example_input, torch.Tensor):
            raise EngineError(f"the {ctx.runtime} target takes models with one input tensor")
        self.ctx, self.example = ctx, ctx.example_input
        self.original_model = original
        self._folder = tempfile.TemporaryDirectory(prefix="search-runtime-")
        self.folder = Path(self._folder.name)
        self.original_file = self.folder / "original"
        breadcrumbs.operation(f"exporting the original to {ctx.runtime}")
        _export_float(ctx.runtime, original, self.example, self.original_file, DeclaredCall(ctx.signature))
        self.original = _load(ctx.runtime, self.original_file, ctx.threads)
        self.original_size = self.original_file.stat().st_size

    def measure(
        self,
        model: nn.Module,
        quantization: dict[str, Any] | None,
        calibration: Dataset | None,
        index: int,
    ) -> tuple[int, torch.Tensor, dict[str, Any]]:
        """(file size, outputs on the fidelity inputs, interleaved speed against the original) of a candidate."""
        runtime = self.ctx.runtime
        float_file = self.folder / f"candidate-{index}-float"
        breadcrumbs.operation(f"exporting the candidate to {runtime}")
        _export_float(runtime, model, self.example, float_file, DeclaredCall(self.ctx.signature))
        artifact = float_file
        if quantization is not None:
            artifact = self.folder / f"candidate-{index}"
            deferred = DeferredQuantization(quantization["scheme"], quantization["options"])
            samples = _calibration(calibration, self.example, deferred.options)
            _quantize(runtime, deferred, model, self.example, float_file, artifact, samples)
        served = _load(runtime, artifact, self.ctx.threads)
        inputs = self._fidelity_inputs()
        breadcrumbs.operation(f"measuring the candidate in {runtime}")
        outputs = predict(served, inputs)
        speed = measure.compare_latency(
            self.original, served, self.example, self.ctx.threads, budget_s=CANDIDATE_SPEED_BUDGET_S
        )
        size = artifact.stat().st_size
        for path in (float_file, artifact):
            path.unlink(missing_ok=True)
        return size, outputs, speed

    def _fidelity_inputs(self) -> torch.Tensor:
        data = self.ctx.eval_data or self.ctx.train_data
        inputs = data.inputs if data is not None else self.example
        assert isinstance(inputs, torch.Tensor)  # a runtime target takes one input tensor
        return inputs.reshape(-1, *self.example.shape[1:]).to(self.example.dtype)

    def close(self) -> None:
        self._folder.cleanup()


def chosen_runtime_quantization(
    info: dict[str, Any], train: Dataset | None, example: Batch, signature: Signature | None, seed: int
) -> tuple[Any, Dataset | None]:
    """The search's chosen runtime quantization, and the data it calibrates on (synthetic when it said so)."""
    chosen = info["runtime_quantization"]
    if info.get("calibration") == "synthetic":
        train = synthetic_calibration(example, signature, seed)
    return DeferredQuantization(chosen["scheme"], chosen["options"]), train
