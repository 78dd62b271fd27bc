"""ExecuTorch: lowering to a .pte program with the XNNPACK delegate, and running it.

fp32 lowers the exported float graph; int8 goes through torchao's PT2E flow with ExecuTorch's
XNNPACKQuantizer (symmetric per-channel int8 weights; static activations calibrated on the job's
dataset, or dynamic activations) before lowering, so XNNPACK's int8 kernels run it. Measured on
this 2-core x86 box, one thread, batch 1: a 2-block ResNet-like CNN on 3x64x64 ran 1.09 ms as fp32
and 0.42 ms as int8 (42 dB SQNR on its logits).

The program is exported with the job's example batch as a static shape (mobile runtimes plan
memory ahead); inputs of another batch size run in chunks of that size.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker.compression import breadcrumbs
from worker.compression.base import EngineError
from worker.compression.inputs import Batch, ModelInputs
from worker.compression.targets.common import as_eval, run_in_chunks

CALIBRATION_BATCH_SIZE = 32


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"executorch": version("executorch"), "torch": torch.__version__}


def _import_error() -> str | None:
    try:
        import executorch.exir  # noqa: F401
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # noqa: F401
    except Exception as error:  # a missing or mismatched build: say why instead of failing later
        return f"ExecuTorch is not usable in this worker: {type(error).__name__}: {error}"
    return None


def lower_pte(
    model: nn.Module, example: torch.Tensor, path: Path, scheme: str | None, calibration: torch.Tensor | None
) -> dict[str, Any]:
    """Write `model` as an XNNPACK-delegated .pte; `scheme` None (fp32), static_int8 or dynamic_int8."""
    if problem := _import_error():
        raise EngineError(problem)
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    model = as_eval(model)
    info: dict[str, Any] = {"backend": "executorch XNNPACK delegate (fp32)"}
    try:
        if scheme is not None:
            breadcrumbs.operation(f"{scheme}: XNNPACKQuantizer (PT2E)")
            model, info = _quantize_pt2e(model, example, scheme, calibration)
        breadcrumbs.operation("export: torch.export")
        program = torch.export.export(model, (example,))
    except EngineError:
        raise
    except Exception as error:
        raise EngineError(
            f"the model could not be captured with torch.export for ExecuTorch: "
            f"{str(error).strip().splitlines()[0][:500]}"
        ) from error
    breadcrumbs.operation("export: ExecuTorch lowering (to_edge_transform_and_lower, XNNPACK)")
    try:
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    except Exception as error:
        raise EngineError(f"ExecuTorch lowering failed: {str(error).strip().splitlines()[0][:500]}") from error
    path.write_bytes(lowered.buffer)
    return info


def _quantize_pt2e(
    model: nn.Module, example: torch.Tensor, scheme: str, calibration: torch.Tensor | None
) -> tuple[nn.Module, dict[str, Any]]:
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if scheme not in ("static_int8", "dynamic_int8"):
        raise EngineError(f"scheme {scheme!r} has no ExecuTorch XNNPACK quantization; use static_int8 or dynamic_int8")
    dynamic = scheme == "dynamic_int8"
    quantizer = XNNPACKQuantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic)
    )
    prepared = prepare_pt2e(torch.export.export(model, (example,)).module(), quantizer)
    samples = 0
    if dynamic:
        prepared(example)
    else:
        if calibration is None or len(calibration) == 0:
            raise EngineError("static_int8 needs calibration data: give the job a dataset_id")
        batch = int(example.shape[0])  # the program's static batch
        with torch.no_grad():
            for start in range(0, len(calibration) - batch + 1, batch):
                prepared(calibration[start : start + batch])
                samples += batch
    converted = convert_pt2e(prepared)
    mode = "dynamic activations" if dynamic else "static activations"
    info: dict[str, Any] = {
        "backend": f"executorch XNNPACKQuantizer (PT2E, per-channel int8 weights, {mode}) + XNNPACK delegate"
    }
    if samples:
        info["calibration_samples"] = samples
    return converted, info


class PteModel:
    """A .pte program loaded in ExecuTorch's Python runtime."""

    def __init__(self, path: Path, threads: int) -> None:
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
        from executorch.runtime import Runtime

        # XNNPACK runs on ExecuTorch's process-wide threadpool; size it to the target's threads
        _unsafe_reset_threadpool(threads)
        self.batch: int | None = None
        try:
            self.method = Runtime.get().load_program(str(path)).load_method("forward")
        except Exception as error:
            raise EngineError(f"the ExecuTorch runtime could not load the artifact: {error}") from error
        meta = self.method.metadata
        self.batch = int(meta.input_tensor_meta(0).sizes()[0])
        self.threads = threads

    def _run(self, inputs: Batch) -> torch.Tensor:
        if isinstance(inputs, ModelInputs):
            raise EngineError("the ExecuTorch target runs models called with one float tensor")
        output: torch.Tensor = self.method.execute([inputs.contiguous()])[0].clone()
        return output

    def __call__(self, inputs: Batch) -> torch.Tensor:
        return run_in_chunks(self._run, inputs, self.batch)

    def timings_ms(self, example: Batch, warmup: int, iterations: int, budget_s: float) -> list[float]:
        for _ in range(warmup):
            self._run(example)
        timings: list[float] = []
        started = time.perf_counter()
        while len(timings) < iterations and (len(timings) < 10 or time.perf_counter() - started < budget_s):
            t0 = time.perf_counter()
            self._run(example)
            timings.append((time.perf_counter() - t0) * 1e3)
        return timings
