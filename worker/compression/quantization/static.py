"""static_int8 (FX graph mode with calibration) and the qat_int8 entry point."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from modelpress.configs import StaticInt8Config
from worker.compression import breadcrumbs
from worker.compression.base import EngineError, StageContext
from worker.compression.graph_lift import torch_level_module
from worker.compression.inputs import Batch, ModelInputs, as_call, call_model
from worker.compression.quantization.plan import _check_swapped, _Done, _require_targets, plan_layers

CALIBRATION_BATCH_SIZE = 32
# for callers that probe with some options only (sensitivity); a stage's options have it already
DEFAULT_CALIBRATION_BATCHES = StaticInt8Config().calibration_batches

# --------------------------------------------------------------------------- static int8


_STATIC_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# FX has no static int8 LSTM / GRU kernel; their weights go int8 with dynamic activations instead
_RECURRENT_TYPES: tuple[type[nn.Module], ...] = (nn.LSTM, nn.GRU)
RECURRENT_NOTE = "int8 weights with dynamic activations (torch has no static int8 LSTM / GRU kernel)"


class _FxTraceFailed(EngineError):
    """torch.fx could not trace the forward (Python control flow on values, item assignment, ...)."""


def _static_int8_eager(model: nn.Module, options: dict[str, Any], ctx: StageContext) -> _Done:
    """FX graph mode on the eager model; where torch.fx cannot trace its forward (Hugging Face
    models: mask building, `**kwargs` signatures), on the model exported by torch.export instead,
    which traces the same code with real tensors, lifted back to layers as an uploaded .pt2 is."""
    try:
        return _static_int8_fx(model, options, ctx)
    except _FxTraceFailed as error:
        fx_error = error
    done = _static_int8_graph(_exported(model, ctx, fx_error), options, ctx)
    done.info["traced_with"] = f"torch.export (torch.fx could not trace the forward: {fx_error.__cause__})"
    return done


def _exported(model: nn.Module, ctx: StageContext, fx_error: _FxTraceFailed) -> nn.Module:
    from worker.compression.inputs import export_program
    from worker.compression.io import tie_shared_parameters

    breadcrumbs.operation("static_int8: exporting with torch.export (torch.fx could not trace the forward)")
    try:
        program = export_program(copy.deepcopy(model).eval(), ctx.signature, ctx.example_input)
    except EngineError as error:
        raise EngineError(
            f"static_int8 could not trace the model's forward with torch.fx ({fx_error.__cause__}) nor "
            f"export it with torch.export ({error}); dynamic_int8 or fp16 do not need a graph"
        ) from error
    # .module() hands tied weights (GPT-2's LM head and embedding) back as two Parameters over one storage
    return tie_shared_parameters(program.module())


def _static_int8_fx(model: nn.Module, options: dict[str, Any], ctx: StageContext) -> _Done:
    from torch.ao.quantization import QConfigMapping, get_default_qconfig_mapping

    batches = _calibration_batches(options, ctx)
    candidates = [
        name for name, module in model.named_modules() if name and type(module) in _STATIC_TYPES + _RECURRENT_TYPES
    ]
    recurrent = {name for name, module in model.named_modules() if type(module) in _RECURRENT_TYPES}
    plan = plan_layers(candidates, options)
    _require_targets(plan, candidates, "Linear / Conv / LSTM / GRU layers", "static_int8")
    mapping = get_default_qconfig_mapping("x86")
    full_range = cpu_has_vnni()
    if full_range:
        mapping.set_global(full_range_qconfig())
    info: dict[str, Any] = {}
    if _has_layer_norm(model):
        # A transformer's residual stream and layer norms span a far wider range than any one layer's
        # output, and one int8 scale for them wrecks the model: with torch's x86 mapping (adds, layer
        # norms, reshapes quantized too) a 2-block ViT kept 17.5 dB (a timm ViT 8 dB) where int8
        # Linears alone keep 29 dB (23 dB), and layer-by-layer mixed precision cannot win it back.
        # So the layers are int8 (their inputs quantized, their outputs dequantized); the rest stays float.
        layer_qconfig = mapping.global_qconfig
        mapping = QConfigMapping()
        for layer_type in _STATIC_TYPES:
            mapping.set_object_type(layer_type, layer_qconfig)
        info["float_ops"] = "everything but the Linear / Conv layers (residual adds, layer norms, attention)"
    for name in plan.skipped + sorted(recurrent):
        mapping.set_module_name(name, None)
    if any(options.get(key, "auto") != "off" for key in ("cross_layer_equalization", "bias_correction")):
        from worker.compression.quantization.repair import quantize_with_repair

        quantized, info["repair"] = quantize_with_repair(
            model, options, ctx, plan.targets, mapping, batches, lambda m, b: _calibrate_and_convert(m, mapping, b, ctx)
        )
    else:
        quantized = _calibrate_and_convert(model, mapping, batches, ctx)
    dynamic = [name for name in plan.targets if name in recurrent]
    if dynamic:
        quantized = _recurrent_dynamic_int8(quantized, dynamic)
        info["dynamic_int8_layers"] = {name: RECURRENT_NOTE for name in dynamic}
    _check_swapped(quantized, plan, "static_int8")
    activation_range = (
        "8-bit (this CPU has VNNI)"
        if full_range
        else "7-bit (reduce_range: without VNNI, fbgemm's int16 accumulation could saturate)"
    )
    info.update(calibration_samples=sum(len(b) for b in batches), activation_range=activation_range)
    return _Done(quantized, "eager", plan, info)


def _has_layer_norm(model: nn.Module) -> bool:
    """Whether `model` has layer norms, as modules or as calls in its graph (a lifted exported program)."""
    if any(isinstance(module, nn.LayerNorm) for module in model.modules()):
        return True
    graph = getattr(model, "graph", None)
    norms = (torch.ops.aten.layer_norm.default, torch.nn.functional.layer_norm, torch.layer_norm)
    return isinstance(graph, torch.fx.Graph) and any(node.target in norms for node in graph.nodes)


def _calibrate_and_convert(model: nn.Module, mapping: Any, batches: list[Batch], ctx: StageContext) -> nn.Module:
    """prepare_fx a copy of `model`, run the calibration batches through it, convert_fx."""
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    float_model = copy.deepcopy(model).eval()
    breadcrumbs.operation("static_int8: tracing with torch.fx (prepare_fx)")
    try:
        prepared = prepare_fx(float_model, mapping, as_call(ctx.example_input)[0])
    except Exception as error:  # symbolic tracing fails on data-dependent control flow
        advice = (
            "this exported program's graph has operations static int8 cannot place observers around; "
            "dynamic_int8 or fp16 do not need that"
            if ctx.kind == "graph"
            else "upload it as an exported program instead"
        )
        raise _FxTraceFailed(
            f"static_int8 could not trace the model's forward with torch.fx ({error}); {advice}"
        ) from error
    breadcrumbs.operation("static_int8: calibrating")
    with torch.no_grad():
        for index, batch in enumerate(batches):
            ctx.check_cancelled()
            call_model(prepared, batch)
            ctx.progress(0.9 * (index + 1) / len(batches), "calibrating")
    breadcrumbs.operation("static_int8: converting to int8 kernels (convert_fx)")
    converted: nn.Module = convert_fx(prepared).eval()
    return converted


def _recurrent_dynamic_int8(model: nn.Module, names: list[str]) -> nn.Module:
    """`model` with the named LSTM / GRU modules swapped for their dynamically quantized versions."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    breadcrumbs.operation("static_int8: LSTM / GRU weights to int8 (quantize_dynamic)")
    qconfig: dict[str, Any] = {name: per_channel_dynamic_qconfig for name in names}
    swapped: nn.Module = quantize_dynamic(model, qconfig, dtype=torch.qint8, inplace=False)  # type: ignore[no-untyped-call]  # torch leaves this unannotated
    return swapped


def cpu_has_vnni() -> bool:
    """VNNI dot products accumulate in int32, so activations can use the full 8-bit range.

    Measured on digits: the full range gains about 5.5 dB of SQNR over torch's x86 default
    (reduce_range=True), which exists for CPUs without VNNI. An artifact made here and run on a
    CPU without VNNI may lose a little of that accuracy to saturation.
    """
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags or "amx_int8" in flags


def full_range_qconfig() -> Any:
    from torch.ao.quantization import QConfig
    from torch.ao.quantization.observer import HistogramObserver, PerChannelMinMaxObserver

    return QConfig(
        activation=HistogramObserver.with_args(reduce_range=False),  # type: ignore[no-untyped-call]  # torch leaves this unannotated
        weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric),
    )


def _static_int8_graph(model: nn.Module, options: dict[str, Any], ctx: StageContext) -> _Done:
    return _static_int8_fx(torch_level_module(model), options, ctx)


def _qat_int8(model: nn.Module, options: dict[str, Any], ctx: StageContext) -> _Done:
    from worker.compression.qat import quantization_aware_training  # imports this module

    return quantization_aware_training(model, options, ctx)


def _calibration_batches(options: dict[str, Any], ctx: StageContext) -> list[Batch]:
    if ctx.train_data is None or len(ctx.train_data) == 0:
        raise EngineError("static_int8 needs calibration data: give the job a dataset_id")
    limit = int(options.get("calibration_batches") or DEFAULT_CALIBRATION_BATCHES) * CALIBRATION_BATCH_SIZE
    inputs = ctx.train_data.inputs[:limit]
    if isinstance(inputs, ModelInputs) or isinstance(ctx.example_input, ModelInputs):
        return list(inputs.split(CALIBRATION_BATCH_SIZE))  # named inputs were cast as declared when loaded
    example = ctx.example_input
    if inputs.shape[1:] != example.shape[1:] and inputs[0].numel() != example[0].numel():
        raise EngineError(
            f"calibration samples have shape {list(inputs.shape[1:])}, the model takes {list(example.shape[1:])}"
        )
    inputs = inputs.reshape(-1, *example.shape[1:]).to(example.dtype)
    return list(inputs.split(CALIBRATION_BATCH_SIZE))  # type: ignore[no-untyped-call]  # torch leaves this unannotated
