"""The end of a job whose target is another runtime (ONNX Runtime, ExecuTorch): export, quantize
with that runtime's tools, and measure where the artifact will be served."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from worker.compression import breadcrumbs
from worker.compression import metrics as measure
from worker.compression.base import Dataset, EngineError
from worker.compression.inputs import Batch

if TYPE_CHECKING:
    from worker.compression.pipeline import JobRequest, Reporter


def finish_for_runtime(
    request: JobRequest,
    model: nn.Module,
    working: nn.Module,
    deferred: Any,
    example: Batch,
    fid_inputs: Batch,
    fid_labels: torch.Tensor | None,
    reference: measure.Outputs,
    torch_original: dict[str, Any],
    parameters: tuple[int, int],
    stage_reports: list[dict[str, Any]],
    train: Dataset | None,
    reporter: Reporter,
    device: torch.device,
) -> dict[str, Any]:
    """Export, quantize with the runtime's tools and measure in the runtime that serves the artifact."""
    from worker.compression.pipeline import build_metrics
    from worker.compression.targets.deploy import REQUIRES, RUNTIME_FORMATS, DeclaredCall, finish_for_target

    # the original in PyTorch, for reference next to the runtime's figures (not part of the speedup)
    torch_original = {**torch_original, **measure.measure_latency(model, example, request.threads)}
    if device.type != "cpu":
        raise EngineError(f"the {request.runtime} target runs on cpu in this deployment")
    breadcrumbs.stage(f"building the {request.runtime} artifact")

    def progress(fraction: float, message: str) -> None:
        breadcrumbs.operation(message)
        reporter.progress(fraction, message)

    built = finish_for_target(
        runtime=request.runtime,
        original_model=model,
        working=working,
        quantization=deferred,
        example=example,
        threads=request.threads,
        artifact=Path(request.artifact_path),
        fid_inputs=fid_inputs,
        fid_labels=fid_labels,
        reference=reference,
        original_parameters=(torch_original["parameters"], torch_original["nonzero_parameters"]),
        parameters=parameters,
        train=train,
        progress=progress,
        call=DeclaredCall(request.signature, request.output),
    )
    fidelity = measure.fidelity(reference, built["outputs"])
    if deferred is not None:
        stage_reports.append(
            {
                "method": "quantize",
                "scheme": deferred.scheme,
                "runtime": request.runtime,
                "accuracy": built["compressed"]["accuracy"],
                "fidelity": fidelity,
                "info": built["quantization_info"],
            }
        )
    document = build_metrics(
        built["original"],
        built["compressed"],
        fidelity,
        stage_reports,
        device=device,
        batch_size=len(example),
        threads=request.threads,
        speed=built["speed"],
    )
    document["runtime"] = request.runtime
    for report in stage_reports:  # a stage's own warnings (a search's synthetic calibration) are part of the outcome
        document["warnings"].extend(w for w in report["info"].get("warnings") or [] if w not in document["warnings"])
    document["versions"] = built["versions"]
    document["original_in_torch"] = {
        k: torch_original[k] for k in ("size_bytes", "latency_ms_p50", "latency_ms_p95", "accuracy")
    }
    document["measured_in"] = (
        f"original and artifact both measured in {request.runtime} (the original exported "
        f"as fp32); fidelity against the float PyTorch model's outputs"
    )
    return {
        "metrics": document,
        "artifact_format": RUNTIME_FORMATS[request.runtime],
        "requires": REQUIRES[request.runtime],
    }
