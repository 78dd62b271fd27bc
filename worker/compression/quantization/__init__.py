"""Quantization stage: int8 on CPU (dynamic and calibrated), fp16/bf16, torchao schemes on CUDA.

Which library runs each (scheme, model kind) pair is decided in one place, the
`BACKENDS` table at the end of this module and `backend_for`: `torch.ao.quantization`
is deprecated and moving to torchao; dynamic_int8 already has its torchao path
(`TORCHAO_DYNAMIC`), chosen when torch.ao cannot be imported or is not the faster.

Every scheme checks afterwards that the layers it targeted changed
representation (packed int8 weights, quantized ops in a TorchScript graph, a
new dtype); a stage that would change nothing raises `EngineError` saying why.

Measured on 2 x86 cores (a shared, busy box: timings are noisy), torch 2.13,
`torch.set_num_threads(2)`:
- dynamic_int8, 1024->4096->ReLU->1024 MLP uploaded as TorchScript, batch 64:
  quantize_dynamic_jit gives 0.25x the file, SQNR 33 dB, 2-4x faster (median
  of interleaved runs); the eager path (quantize_dynamic, then traced) matches.
- static_int8, LeNet-style CNN on 8x8 digits, exported program, batch 64, 128
  calibration samples: FX graph mode (x86 qconfig, fbgemm/onednn int8 kernels,
  traced to TorchScript) runs 0.2-0.3 ms against 1.1-1.3 ms in float (4-5x),
  file 0.13x the float .pt2, top-1 unchanged (0.977).
  PT2E (torchao prepare_pt2e/convert_pt2e with X86InductorQuantizer),
  re-exported: the same top-1, but q/dq pairs around float kernels give no
  speedup without torch.compile, the .pt2 only loads after importing torch's
  `quantized_decomposed` op library, and it came out 1.16x the float file
  because the graph keeps the float weights beside the folded int8 ones. So
  exported programs are lifted back to torch-level modules
  (`torch_level_module`) and go through FX.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from worker.compression.base import EngineError, ModelKind, StageContext, StageResult, with_defaults

# Re-exported: the names other modules, tests and benchmarks import from `worker.compression.quantization`.
from worker.compression.graph_lift import torch_level_module as torch_level_module
from worker.compression.inputs import call_model, select_output
from worker.compression.quantization.dynamic import _DYNAMIC_TYPES as _DYNAMIC_TYPES
from worker.compression.quantization.dynamic import _dynamic_int8_eager, _dynamic_int8_graph, _dynamic_int8_torchscript
from worker.compression.quantization.dynamic import _fresh_script_copy as _fresh_script_copy
from worker.compression.quantization.dynamic import _isolate_control_flow_outputs as _isolate_control_flow_outputs
from worker.compression.quantization.dynamic import _script_type_name as _script_type_name
from worker.compression.quantization.dynamic import count_quantized_ops as count_quantized_ops
from worker.compression.quantization.dynamic_torchao import _dynamic_int8_torchao, use_torch_ao_dynamic
from worker.compression.quantization.half import CastWrapper as CastWrapper
from worker.compression.quantization.half import _half_precision
from worker.compression.quantization.plan import LayerPlan as LayerPlan
from worker.compression.quantization.plan import _Done, _model_device, _quiet_deprecations
from worker.compression.quantization.plan import plan_layers as plan_layers
from worker.compression.quantization.static import _STATIC_TYPES as _STATIC_TYPES
from worker.compression.quantization.static import CALIBRATION_BATCH_SIZE as CALIBRATION_BATCH_SIZE
from worker.compression.quantization.static import _calibration_batches as _calibration_batches
from worker.compression.quantization.static import _qat_int8, _static_int8_eager, _static_int8_graph
from worker.compression.quantization.static import cpu_has_vnni as cpu_has_vnni
from worker.compression.quantization.static import full_range_qconfig as full_range_qconfig
from worker.compression.quantization.torchao_cuda import _torchao_config as _torchao_config
from worker.compression.quantization.torchao_cuda import _torchao_cuda

__all__ = [
    "BACKENDS",
    "Backend",
    "LayerPlan",
    "backend_for",
    "plan_layers",
    "run_stage",
    "sqnr_db",
    "torch_level_module",
]


def run_stage(model: nn.Module, scheme: str, options: dict[str, Any], ctx: StageContext) -> StageResult:
    """Quantize `model` with `scheme` and return the changed model.

    Args:
        model: an eager module, a ScriptModule or an exported program's `.module()`, per `ctx.kind`.
        scheme: a `quantize` scheme of `modelpress.catalog` ("dynamic_int8", "static_int8", "fp16", ...).
        options: the validated stage options (skip_layers, keep_first_last_float, calibration_batches, ...).
        ctx: example input, calibration data (`ctx.train_data`) and device.

    Returns:
        A StageResult whose info names the backend and the quantized, skipped and
        float-left layers; `preferred_output_format` is set when only one format
        can hold the result, `requires` when loading it needs more than torch.

    Example:
        >>> result = run_stage(model, "dynamic_int8", {"skip_layers": []}, StageContext("eager", x))
    """
    backend = backend_for(scheme, ctx.kind)
    options = with_defaults("quantize", scheme, options)
    ctx.progress(0.0, f"{scheme}: {backend.library}")
    reference = _reference_output(model, ctx)
    prepared: dict[str, Any] = {}
    if options.get("smoothquant"):
        from worker.compression.smoothquant import smooth_for_stage

        smoothed = smooth_for_stage(model, scheme, options, ctx)
        model, ctx, prepared["smoothquant"] = smoothed.model, smoothed.ctx, smoothed.info
        backend = backend_for(scheme, ctx.kind)
    with _quiet_deprecations():
        if options.get("min_sqnr_db") is not None or options.get("max_accuracy_drop") is not None:
            from worker.compression.mixed_precision import quantize_to_bar

            done = quantize_to_bar(model, scheme, backend, options, ctx)
        else:
            done = backend.run(model, options, ctx)
    info: dict[str, Any] = {
        "scheme": scheme,
        "backend": backend.library,
        "quantized_layers": done.plan.targets,
        "skipped_layers": done.plan.skipped,
        "left_float": done.plan.left_float,
        **prepared,
        **done.info,
    }
    if reference is not None:
        info["sqnr_db_on_example_input"] = _sqnr_or_none(done.model, reference, ctx)
    ctx.progress(1.0, f"{scheme}: {len(done.plan.targets)} layers quantized")
    return StageResult(
        model=done.model,
        kind=done.kind,
        info=info,
        preferred_output_format=backend.output_format,
        requires=list(backend.requires),
    )


def sqnr_db(reference: torch.Tensor, output: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(mean(ref^2) / mean((ref - out)^2))."""
    reference = reference.detach().float()
    noise = (reference - output.detach().float()).pow(2).mean().item()
    signal = reference.pow(2).mean().item()
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


# --------------------------------------------------------------------------- checks and helpers


def _reference_output(model: nn.Module, ctx: StageContext) -> torch.Tensor | None:
    if ctx.kind != "torchscript" and any(p.device.type == "meta" for p in model.parameters()):
        return None
    try:
        with torch.no_grad():
            output = call_model(model, ctx.example_input.to(_model_device(model)))
    except Exception as error:
        raise EngineError(f"the model does not run on the example input: {error}") from error
    chosen = select_output(output, ctx.signature.output if ctx.signature is not None else None)
    return chosen.detach().float().cpu()


def _sqnr_or_none(model: nn.Module, reference: torch.Tensor, ctx: StageContext) -> float | None:
    with torch.no_grad():
        output = call_model(model, ctx.example_input.to(_model_device(model)))
    output = select_output(output, ctx.signature.output if ctx.signature is not None else None)
    if output.shape != reference.shape:
        return None
    value = sqnr_db(reference, output.cpu())
    return None if math.isinf(value) else round(value, 2)


# --------------------------------------------------------------------------- the backend table


@dataclass(frozen=True)
class Backend:
    """How one (scheme, model kind) pair is quantized and what its artifact needs."""

    library: str
    run: Callable[[nn.Module, dict[str, Any], StageContext], _Done]
    # the only format that can hold the result, when there is one
    output_format: str | None = None
    # packages, besides torch, that loading the artifact needs
    requires: tuple[str, ...] = ()


def _cuda_backends(kind: ModelKind) -> dict[tuple[str, ModelKind], Backend]:
    # torchao tensor subclasses trace with torch.export but not torch.jit, and need torchao to load.
    return {
        (scheme, kind): Backend(
            f"torchao.quantization.quantize_ ({scheme})", _torchao_cuda(scheme), "exported_program", ("torchao",)
        )
        for scheme in ("int8_weight_only", "int8_dynamic", "int4_weight_only", "float8")
    }


BACKENDS: dict[tuple[str, ModelKind], Backend] = {
    ("dynamic_int8", "eager"): Backend("torch.ao.quantization.quantize_dynamic", _dynamic_int8_eager, "torchscript"),
    ("dynamic_int8", "torchscript"): Backend(
        "torch.ao.quantization.quantize_dynamic_jit", _dynamic_int8_torchscript, "torchscript"
    ),
    ("dynamic_int8", "graph"): Backend(
        "torch.ao.quantization.quantize_dynamic on the lifted exported graph", _dynamic_int8_graph, "torchscript"
    ),
    ("static_int8", "eager"): Backend(
        "torch.ao.quantization.quantize_fx (x86 qconfig); torch.export where torch.fx cannot trace",
        _static_int8_eager,
        "torchscript",
    ),
    ("static_int8", "graph"): Backend(
        "torch.ao.quantization.quantize_fx (x86 qconfig) on the lifted exported graph",
        _static_int8_graph,
        "torchscript",
    ),
    **{
        ("qat_int8", kind): Backend(
            "torchao PT2E QAT (prepare_qat_pt2e, X86InductorQuantizer), then "
            "torch.ao.quantization.quantize_fx as static_int8",
            _qat_int8,
            "torchscript",
        )
        for kind in ("eager", "graph")
    },
    **{
        ("fp16", kind): Backend("torch (Module.to float16)", _half_precision(torch.float16))
        for kind in ("eager", "graph", "torchscript")
    },
    **{
        ("bf16", kind): Backend("torch (Module.to bfloat16)", _half_precision(torch.bfloat16))
        for kind in ("eager", "graph", "torchscript")
    },
    **_cuda_backends("eager"),
    **_cuda_backends("graph"),
}


# dynamic_int8 when torch.ao.quantization is gone or slower: torchao, exported to a .pt2 that needs torchao
TORCHAO_DYNAMIC = Backend(
    "torchao.quantization.quantize_ (Int8DynamicActivationInt8WeightConfig)",
    _dynamic_int8_torchao,
    "exported_program",
    ("torchao",),
)


def backend_for(scheme: str, kind: ModelKind) -> Backend:
    """The backend that quantizes a `kind` model with `scheme`; EngineError if there is none."""
    if scheme == "dynamic_int8" and not use_torch_ao_dynamic():
        return TORCHAO_DYNAMIC
    backend = BACKENDS.get((scheme, kind))
    if backend is None:
        kinds = sorted(k for s, k in BACKENDS if s == scheme)
        if not kinds:
            raise EngineError(f"unknown quantization scheme {scheme!r}")
        raise EngineError(f"quantization scheme {scheme!r} cannot take a {kind} model; it takes {kinds}")
    return backend
