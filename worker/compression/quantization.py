"""Quantization stage: int8 on CPU (dynamic and calibrated), fp16/bf16, torchao schemes on CUDA.

Which library runs each (scheme, model kind) pair is decided in one place, the
`BACKENDS` table at the end of this module: `torch.ao.quantization` is
deprecated and moving to torchao, and when it goes only that table changes.

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

import copy
import fnmatch
import io
import math
import operator
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from worker.compression.base import EngineError, ModelKind, StageContext, StageResult
from worker.compression.inputs import Batch, ModelInputs, as_call, call_model, map_floating, select_output

__all__ = ["BACKENDS", "Backend", "LayerPlan", "backend_for", "plan_layers", "run_stage", "sqnr_db",
           "torch_level_module"]

CALIBRATION_BATCH_SIZE = 32


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
    return StageResult(model=done.model, kind=done.kind, info=info,
                       preferred_output_format=backend.output_format, requires=list(backend.requires))


def sqnr_db(reference: torch.Tensor, output: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(mean(ref^2) / mean((ref - out)^2))."""
    reference = reference.detach().float()
    noise = (reference - output.detach().float()).pow(2).mean().item()
    signal = reference.pow(2).mean().item()
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


# --------------------------------------------------------------------------- layer selection


@dataclass
class LayerPlan:
    """The candidate layers of a scheme split into those to quantize and those left alone."""

    targets: list[str]
    skipped: list[str]
    # layer name -> why the backend cannot change it (reported, not an error)
    left_float: dict[str, str] = field(default_factory=dict)


@dataclass
class _Done:
    """What a backend hands back to `run_stage`."""

    model: nn.Module
    kind: ModelKind
    plan: LayerPlan
    info: dict[str, Any] = field(default_factory=dict)


def plan_layers(candidates: Sequence[str], options: dict[str, Any]) -> LayerPlan:
    """Split `candidates` (module names, in definition order) by skip_layers and keep_first_last_float.

    Example:
        >>> plan_layers(["fc1", "fc2", "fc3"], {"skip_layers": ["fc2"], "keep_first_last_float": False})
        LayerPlan(targets=['fc1', 'fc3'], skipped=['fc2'], left_float={})
    """
    patterns = list(options.get("skip_layers") or [])
    ends = {candidates[0], candidates[-1]} if candidates and options.get("keep_first_last_float") else set()
    skipped = [name for name in candidates
               if name in ends or any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)]
    return LayerPlan(targets=[name for name in candidates if name not in skipped], skipped=skipped)


def _require_targets(plan: LayerPlan, candidates: Sequence[str], what: str, scheme: str) -> None:
    if not candidates:
        raise EngineError(f"{scheme} found no {what} in this model, so it would change nothing")
    if not plan.targets:
        raise EngineError(f"{scheme}: all {len(candidates)} {what} ({', '.join(candidates)}) are excluded by "
                          "skip_layers / keep_first_last_float, so the stage would change nothing")


# --------------------------------------------------------------------------- dynamic int8


_DYNAMIC_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell, nn.RNNCell)
_DYNAMIC_WHAT = "Linear / LSTM / GRU layers"


def _dynamic_int8_eager(model: nn.Module, options: dict[str, Any], ctx: StageContext) -> _Done:
    from torch.ao.quantization import float_qparams_weight_only_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    # Exact types: subclasses such as MultiheadAttention's out_proj are not swapped by quantize_dynamic.
    candidates = [name for name, module in model.named_modules() if name and type(module) in _DYNAMIC_TYPES]
    plan = plan_layers(candidates, options)
    _require_targets(plan, candidates, _DYNAMIC_WHAT, "dynamic_int8")
    qconfig: dict[str, Any] = {name: per_channel_dynamic_qconfig for name in plan.targets}
    embeddings = _embedding_targets(model, options)
    qconfig.update({name: float_qparams_weight_only_qconfig for name in embeddings})
    quantized = quantize_dynamic(model, qconfig, dtype=torch.qint8, inplace=False)
    _check_swapped(quantized, plan, "dynamic_int8")
    info: dict[str, Any] = {}
    if options.get("quantize_embeddings"):
        modules = dict(quantized.named_modules())
        info["quantized_embeddings"] = [name for name in embeddings if _is_quantized_module(modules[name])]
    return _Done(quantized.eval(), "eager", plan, info)


def _embedding_targets(model: nn.Module, options: dict[str, Any]) -> list[str]:
    """Embedding tables for weight-only int8 (one scale and offset per row), when quantize_embeddings is set.

    They are most of a small transformer's file (a 30k x 768 table is 23M of BERT-base's 110M
    weights), so without them int8 shrinks such a file far less than 4x.
    """
    if not options.get("quantize_embeddings"):
        return []
    names = [name for name, module in model.named_modules() if name and type(module) in (nn.Embedding, nn.EmbeddingBag)]
    if not names:
        raise EngineError("quantize_embeddings: this model has no nn.Embedding / nn.EmbeddingBag")
    return plan_layers(names, {"skip_layers": options.get("skip_layers")}).targets


def _dynamic_int8_torchscript(model: nn.Module, options: dict[str, Any], ctx: StageContext) -> _Done:
    # quantize_dynamic on a ScriptModule returns it unchanged without a word; the JIT
    # graph pass rewrites aten::linear (module or functional) to quantized::linear_dynamic.
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic_jit

    if not isinstance(model, torch.jit.ScriptModule):
        raise EngineError("a torchscript-kind model must be a torch.jit.ScriptModule")
    if options.get("quantize_embeddings"):
        raise EngineError("quantize_embeddings needs an eager model or an exported program: the TorchScript "
                          "path (quantize_dynamic_jit) quantizes Linear only")
    kinds = {name: _script_type_name(module) for name, module in model.named_modules() if name}
    candidates = [name for name, kind in kinds.items() if kind == "Linear"]
    plan = plan_layers(candidates, options)
    plan.left_float.update({name: "the TorchScript path (quantize_dynamic_jit) quantizes Linear only"
                            for name, kind in kinds.items() if kind in ("LSTM", "GRU", "RNN")})
    qconfig: dict[str, Any] = {"": per_channel_dynamic_qconfig, **{name: None for name in plan.skipped}}
    working = _fresh_script_copy(model)
    _isolate_control_flow_outputs(working)
    quantized = quantize_dynamic_jit(working.eval(), qconfig, inplace=True)
    ops = count_quantized_ops(quantized)
    if ops == 0:
        _require_targets(plan, candidates, "Linear layers", "dynamic_int8")  # names the usual cause
        raise EngineError("dynamic_int8 left no quantized op in this TorchScript model (the TorchScript "
                          "path covers Linear only), so it would change nothing")
    return _Done(quantized, "torchscript", plan, {"quantized_ops": ops})


def _dynamic_int8_graph(model: nn.Module, options: dict[str, Any], ctx: StageContext) -> _Done:
    # Dynamically quantized Linear holds torchbind packed weights that torch.export
    # cannot trace, so the result is an eager module stored as TorchScript.
    return _dynamic_int8_eager(torch_level_module(model), options, ctx)


def _fresh_script_copy(model: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    # deepcopy shares the class types, hence the method graphs, with the upload;
    # a save/load round trip gives graphs of its own to rewrite.
    buffer = io.BytesIO()
    torch.jit.save(model, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer, map_location="cpu")


def _isolate_control_flow_outputs(model: torch.jit.ScriptModule) -> None:
    """Route every tensor leaving an if/loop through aten::clone, in all methods of all submodules.

    The JIT dynamic-quant pass places the observer of a Linear input that comes
    straight out of a prim::If before the If itself, and finalizing then fails with
    "Graph::copy() encountered a use of a value ... not in scope" (torch 2.13).
    A clone gives the observer an ordinary value to sit on.
    """
    for module in model.modules():
        for method_name in module._c._method_names():
            graph = module._c._get_method(method_name).graph
            for node in list(_walk_nodes(graph.nodes())):
                if node.kind() not in ("prim::If", "prim::Loop"):
                    continue
                for value in node.outputs():
                    if not value.uses() or not isinstance(value.type(), torch._C.TensorType):
                        continue
                    clone = graph.create("aten::clone")
                    clone.insertAfter(node)
                    with graph.insert_point_guard(clone):
                        none = graph.insertConstant(None)
                    value.replaceAllUsesWith(clone.output())
                    clone.addInput(value)
                    clone.addInput(none)
                    clone.output().setType(value.type())
            torch._C._jit_pass_lint(graph)


def _script_type_name(module: nn.Module) -> str:
    return str(getattr(module, "original_name", type(module).__name__))


def count_quantized_ops(model: torch.jit.ScriptModule) -> int:
    """How many `quantized::` ops the inlined forward graph of a ScriptModule calls."""
    graph = model.inlined_graph
    return sum(1 for node in _walk_nodes(graph.nodes()) if node.kind().startswith("quantized::"))


def _walk_nodes(nodes: Any) -> Iterator[Any]:
    for node in nodes:
        yield node
        for block in node.blocks():
            yield from _walk_nodes(block.nodes())


def _is_quantized_module(module: nn.Module) -> bool:
    return type(module).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized"))


def _check_swapped(model: nn.Module, plan: LayerPlan, scheme: str) -> None:
    modules = dict(model.named_modules())
    _keep_changed(plan, lambda name: name in modules and _is_quantized_module(modules[name]),
                  "the backend left it in float (its pattern is not quantizable here)", scheme)


def _keep_changed(plan: LayerPlan, changed: Callable[[str], bool], reason: str, scheme: str) -> None:
    """Move targets the backend did not change to `left_float`; fail if none changed."""
    for name in list(plan.targets):
        if not changed(name):
            plan.targets.remove(name)
            plan.left_float[name] = reason
    if not plan.targets:
        raise EngineError(f"{scheme} changed no layer: " + "; ".join(f"{k}: {v}" for k, v in plan.left_float.items()))


# --------------------------------------------------------------------------- static int8


_STATIC_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _static_int8_fx(model: nn.Module, options: dict[str, Any], ctx: StageContext) -> _Done:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    batches = _calibration_batches(options, ctx)
    candidates = [name for name, module in model.named_modules() if name and type(module) in _STATIC_TYPES]
    plan = plan_layers(candidates, options)
    _require_targets(plan, candidates, "Linear / Conv layers", "static_int8")
    mapping = get_default_qconfig_mapping("x86")
    full_range = cpu_has_vnni()
    if full_range:
        mapping.set_global(full_range_qconfig())
    for name in plan.skipped:
        mapping.set_module_name(name, None)
    float_model = copy.deepcopy(model).eval()
    try:
        prepared = prepare_fx(float_model, mapping, as_call(ctx.example_input)[0])
    except Exception as error:  # symbolic tracing fails on data-dependent control flow
        advice = ("this exported program's graph has operations static int8 cannot place observers around; "
                  "dynamic_int8 or fp16 do not need that" if ctx.kind == "graph"
                  else "upload it as an exported program instead")
        raise EngineError(f"static_int8 could not trace the model's forward with torch.fx ({error}); "
                          f"{advice}") from error
    with torch.no_grad():
        for index, batch in enumerate(batches):
            ctx.check_cancelled()
            call_model(prepared, batch)
            ctx.progress(0.9 * (index + 1) / len(batches), "calibrating")
    quantized = convert_fx(prepared).eval()
    _check_swapped(quantized, plan, "static_int8")
    activation_range = ("8-bit (this CPU has VNNI)" if full_range else
                        "7-bit (reduce_range: without VNNI, fbgemm's int16 accumulation could saturate)")
    return _Done(quantized, "eager", plan, {"calibration_samples": sum(len(b) for b in batches),
                                            "activation_range": activation_range})


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

    return QConfig(activation=HistogramObserver.with_args(reduce_range=False),
                   weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric))


def _static_int8_graph(model: nn.Module, options: dict[str, Any], ctx: StageContext) -> _Done:
    return _static_int8_fx(torch_level_module(model), options, ctx)


def _qat_int8(model: nn.Module, options: dict[str, Any], ctx: StageContext) -> _Done:
    from worker.compression.qat import quantization_aware_training  # imports this module

    return quantization_aware_training(model, options, ctx)


def _calibration_batches(options: dict[str, Any], ctx: StageContext) -> list[Batch]:
    if ctx.train_data is None or len(ctx.train_data) == 0:
        raise EngineError("static_int8 needs calibration data: give the job a dataset_id")
    limit = int(options.get("calibration_batches") or 16) * CALIBRATION_BATCH_SIZE
    inputs = ctx.train_data.inputs[:limit]
    if isinstance(inputs, ModelInputs) or isinstance(ctx.example_input, ModelInputs):
        return list(inputs.split(CALIBRATION_BATCH_SIZE))  # named inputs were cast as declared when loaded
    example = ctx.example_input
    if inputs.shape[1:] != example.shape[1:] and inputs[0].numel() != example[0].numel():
        raise EngineError(f"calibration samples have shape {list(inputs.shape[1:])}, the model takes "
                          f"{list(example.shape[1:])}")
    inputs = inputs.reshape(-1, *example.shape[1:]).to(example.dtype)
    return list(inputs.split(CALIBRATION_BATCH_SIZE))


# --------------------------------------------------------------------------- fp16 / bf16


class CastWrapper(nn.Module):
    """Runs `inner` in `dtype`: floating inputs are cast in, floating outputs cast back to `out_dtype`,
    keeping the output's own structure (a tensor, or a tuple / dict of them)."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype, out_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.inner = inner
        self.dtype = dtype
        self.out_dtype = out_dtype

    # `x` named first: torch.export matches a one-input model's dynamic_shapes to it
    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        args = tuple(a.to(self.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                     for a in (x, *args))
        return map_floating(self.inner(*args, **kwargs), lambda t: t.to(self.out_dtype))


class _ScriptCastWrapper(nn.Module):
    """CastWrapper for TorchScript models of one tensor in, one tensor out (scriptable signature)."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype, out_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.inner = inner
        self.dtype = dtype
        self.out_dtype = out_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            x = x.to(self.dtype)
        return self.inner(x).to(self.out_dtype)


def _half_precision(dtype: torch.dtype) -> Callable[[nn.Module, dict[str, Any], StageContext], _Done]:
    def run(model: nn.Module, options: dict[str, Any], ctx: StageContext) -> _Done:
        return _to_dtype(model, dtype, options, ctx)
    return run


def _to_dtype(model: nn.Module, dtype: torch.dtype, options: dict[str, Any], ctx: StageContext) -> _Done:
    scheme = "fp16" if dtype == torch.float16 else "bf16"
    out_dtype = _output_dtype(model, ctx.example_input)
    if ctx.kind == "graph" and (options.get("skip_layers") or options.get("keep_first_last_float")):
        model = torch_level_module(model)  # skipped layers need to be submodule calls to be wrapped
    candidates = [name for name, module in model.named_modules()
                  if name and any(p.is_floating_point() for p in module.parameters(recurse=False))]
    plan = plan_layers(candidates, options)
    _require_targets(plan, candidates, "layers with floating-point parameters", scheme)
    if ctx.kind == "torchscript":
        if plan.skipped:
            raise EngineError(f"{scheme}: skip_layers is not supported for TorchScript models "
                              "(their submodules cannot be wrapped); upload an eager model or drop skip_layers")
        if isinstance(ctx.example_input, ModelInputs):
            raise EngineError(f"{scheme} on a TorchScript model takes models of one float input; this one takes "
                              f"{ctx.example_input.describe()}: upload it as an exported program")
        converted = copy.deepcopy(model).to(dtype)
        wrapped: nn.Module = torch.jit.script(_ScriptCastWrapper(converted, dtype, out_dtype))
    else:
        converted = copy.deepcopy(model).to(dtype)
        for name in sorted(plan.skipped, key=lambda n: -n.count(".")):  # innermost first
            # Skipped layers stay float32 and talk to their half-precision neighbours through casts.
            module = converted.get_submodule(name)
            _replace_submodule(converted, name, CastWrapper(module.float(), torch.float32, dtype))
        wrapped = CastWrapper(converted, dtype, out_dtype)
    if not any(_has_dtype(converted, name, dtype) for name in plan.targets):
        raise EngineError(f"{scheme} changed no parameter to {dtype}")
    _run_or_explain(wrapped, ctx.example_input, scheme)
    return _Done(wrapped.eval(), ctx.kind, plan, {"dtype": str(dtype).removeprefix("torch.")})


def _has_dtype(model: nn.Module, name: str, dtype: torch.dtype) -> bool:
    module = dict(model.named_modules())[name]  # ScriptModules have no get_submodule
    return any(p.dtype == dtype for p in module.parameters(recurse=False))


def _output_dtype(model: nn.Module, example: Batch) -> torch.dtype:
    """The dtype of the model's (selected floating) output, which the converted model returns too."""
    with torch.no_grad():
        output = call_model(model, example.to(_model_device(model)))
    return select_output(output).dtype


def _run_or_explain(model: nn.Module, example: Batch, scheme: str) -> None:
    try:
        with torch.no_grad():
            call_model(model, example.to(_model_device(model)))
    except RuntimeError as error:
        raise EngineError(f"{scheme}: the converted model does not run ({error}); it probably creates "
                          "float32 tensors inside forward, so it cannot run in reduced precision") from error


# --------------------------------------------------------------------------- CUDA (torchao)


def _torchao_config(scheme: str, options: dict[str, Any]) -> Any:
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Int4WeightOnlyConfig,
                                      Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig)
    from torchao.quantization.quantize_.workflows.int4.int4_packing_format import Int4PackingFormat

    if scheme == "int8_weight_only":
        return Int8WeightOnlyConfig()
    if scheme == "int8_dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    if scheme == "int4_weight_only":
        # tinygemm kernels ship with torch's CUDA build; the default "plain" format needs extra kernels.
        return Int4WeightOnlyConfig(group_size=int(options.get("group_size") or 128),
                                    int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D)
    if scheme == "float8":
        return Float8DynamicActivationFloat8WeightConfig()
    raise EngineError(f"unknown torchao scheme {scheme!r}")


def _torchao_cuda(scheme: str) -> Callable[[nn.Module, dict[str, Any], StageContext], _Done]:
    def run(model: nn.Module, options: dict[str, Any], ctx: StageContext) -> _Done:
        return _quantize_with_torchao(model, scheme, options, ctx)
    return run


def _quantize_with_torchao(model: nn.Module, scheme: str, options: dict[str, Any], ctx: StageContext) -> _Done:
    if not torch.cuda.is_available():
        raise EngineError(f"{scheme} runs on CUDA only and this worker has no GPU")
    device = ctx.device if ctx.device.type == "cuda" else torch.device("cuda")
    if scheme == "float8" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise EngineError(f"float8 needs compute capability >= 8.9; this GPU has {major}.{minor}")
    from torchao.quantization import quantize_

    eager = torch_level_module(model) if ctx.kind == "graph" else copy.deepcopy(model)
    out_dtype = _output_dtype(eager, ctx.example_input)
    candidates = [name for name, module in eager.named_modules() if name and type(module) is nn.Linear]
    plan = plan_layers(candidates, options)
    _require_targets(plan, candidates, "Linear layers", scheme)
    work_dtype = torch.bfloat16  # torchao's CUDA kernels (tinygemm int4, float8, int8 mm) are tuned for bf16
    eager = eager.to(device=device, dtype=work_dtype).eval()
    targets = set(plan.targets)
    quantize_(eager, _torchao_config(scheme, options), filter_fn=lambda module, fqn: fqn in targets)
    modules = dict(eager.named_modules())
    # quantize_ swaps the weight for a torchao tensor subclass; a plain tensor means it was passed over
    _keep_changed(plan, lambda name: type(modules[name].weight) not in (torch.Tensor, nn.Parameter),
                  "torchao did not quantize it (shape or dtype not supported by the kernel)", scheme)
    wrapped = CastWrapper(eager, work_dtype, out_dtype).eval()
    _run_or_explain(wrapped, ctx.example_input, scheme)
    return _Done(wrapped, "eager", plan, {"device": str(device)})


# --------------------------------------------------------------------------- exported graph -> torch-level module


def torch_level_module(graph_module: nn.Module) -> fx.GraphModule:
    """Rebuild an exported program's `.module()` as a torch-level fx.GraphModule.

    aten.linear / aten.convNd calls on parameters become nn.Linear / nn.ConvNd
    submodules named after their parameters' owner ("fc1", "features.0"), and
    common aten ops become their torch functions, so eager-mode tooling
    (quantize_dynamic, FX quantization, torchao quantize_, torch.jit.trace)
    sees the layers. Ops without a translation are kept as aten calls; they run
    in float. The input-shape guards of the exported program are dropped.

    Example:
        >>> eager = torch_level_module(torch.export.load("model.pt2").module())
    """
    if not isinstance(graph_module, fx.GraphModule):
        raise EngineError("a graph-kind model must be the .module() of an exported program")
    root = nn.Module()
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    lifted: dict[tuple[str, ...], str] = {}  # targets of the parameters -> submodule name

    def arg(value: Any) -> Any:
        return fx.node.map_arg(value, lambda node: env[node])

    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder(node.name)
        elif node.op == "get_attr":
            _copy_attribute(graph_module, root, node.target)
            env[node] = graph.get_attr(node.target)
        elif node.op == "call_module":
            if node.target == "_guards_fn" or not node.users:
                continue  # shape guards of the export; nothing reads them
            raise EngineError(f"unexpected submodule call {node.target!r} in the exported graph")
        elif node.op == "call_function":
            env[node] = _translate_call(graph_module, root, graph, node, arg, lifted)
        elif node.op == "output":
            leaves = list(node.args[0]) if isinstance(node.args[0], (tuple, list)) else [node.args[0]]
            graph.output(_unflatten_output(graph_module, [arg(leaf) for leaf in leaves]))
        else:
            raise EngineError(f"unsupported node {node.op} in the exported graph")
    rebuilt = fx.GraphModule(root, graph, class_name="TorchLevelModule")
    rebuilt.graph.eliminate_dead_code()
    rebuilt.recompile()
    return rebuilt.eval()


_CONV_TYPES: dict[Any, type[nn.Module]] = {}
_SIMPLE_CALLS: dict[Any, Callable[..., Any]] = {}


def _aten_tables() -> None:
    aten = torch.ops.aten
    _CONV_TYPES.update({aten.conv1d.default: nn.Conv1d, aten.conv2d.default: nn.Conv2d,
                        aten.conv3d.default: nn.Conv3d, aten.conv1d.padding: nn.Conv1d,
                        aten.conv2d.padding: nn.Conv2d, aten.conv3d.padding: nn.Conv3d})
    _SIMPLE_CALLS.update({
        aten.relu.default: F.relu, aten.relu_.default: F.relu,
        aten.sigmoid.default: torch.sigmoid, aten.tanh.default: torch.tanh,
        aten.flatten.using_ints: torch.flatten, aten.view.default: torch.reshape,
        aten.reshape.default: torch.reshape, aten.cat.default: torch.cat,
        aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d, aten.mean.dim: torch.mean,
        aten.permute.default: torch.permute, aten.transpose.int: torch.transpose,
        aten.add.Tensor: operator.add, aten.mul.Tensor: operator.mul,
    })


def _translate_call(source: fx.GraphModule, root: nn.Module, graph: fx.Graph, node: fx.Node,
                    arg: Callable[[Any], Any], lifted: dict[tuple[str, ...], str]) -> Any:
    if not _SIMPLE_CALLS:
        _aten_tables()
    aten = torch.ops.aten
    target = node.target
    kwargs = dict(node.kwargs)
    if target in (aten.linear.default, *_CONV_TYPES) and _reads_attributes(node, (1,)) and not kwargs:
        name = _lift(source, root, node, lifted, (1, 2), _make_layer)
        return graph.call_module(name, (arg(node.args[0]),))
    if (target is aten.batch_norm.default and _reads_attributes(node, (1, 2, 3, 4)) and not node.args[5]
            and not kwargs):
        name = _lift(source, root, node, lifted, (1, 2, 3, 4), _make_batch_norm)
        return graph.call_module(name, (arg(node.args[0]),))
    if target is aten.sym_size.int:
        # a method call keeps the size symbolic when the module is traced again
        return graph.call_method("size", (arg(node.args[0]), node.args[1]))
    if target in (aten.max_pool2d.default, aten.avg_pool2d.default) and not kwargs:
        pool = F.max_pool2d if target is aten.max_pool2d.default else F.avg_pool2d
        args = list(node.args)
        if len(args) > 2 and not args[2]:
            args[2] = None  # aten's empty stride means "same as the kernel"
        return graph.call_function(pool, tuple(arg(args)))
    if target in (aten.add.Tensor, aten.mul.Tensor) and kwargs:
        return graph.call_function(target, arg(node.args), arg(kwargs))
    if target in _SIMPLE_CALLS:
        return graph.call_function(_SIMPLE_CALLS[target], arg(node.args), arg(kwargs))
    return graph.call_function(target, arg(node.args), arg(kwargs))


def _reads_attributes(node: fx.Node, indices: tuple[int, ...]) -> bool:
    """Whether the node's arguments at `indices` are parameters or buffers (get_attr nodes)."""
    return all(isinstance(node.args[i], fx.Node) and node.args[i].op == "get_attr"  # type: ignore[union-attr]
               for i in indices if i < len(node.args))


def _lift(source: fx.GraphModule, root: nn.Module, node: fx.Node, lifted: dict[tuple[str, ...], str],
          indices: tuple[int, ...], make: Callable[[fx.Node, list[Any]], nn.Module]) -> str:
    """Put a module that owns the node's parameters (args at `indices`) on `root`; return its name."""
    attributes = [node.args[i] if i < len(node.args) else None for i in indices]
    for attribute in attributes:
        if attribute is not None and not (isinstance(attribute, fx.Node) and attribute.op == "get_attr"):
            raise EngineError(f"a {node.target} call computes its parameters; only stored parameters are supported")
    key = tuple(str(a.target) if isinstance(a, fx.Node) else "" for a in attributes)
    if key in lifted:
        return lifted[key]
    owner = key[0].rpartition(".")[0]
    name = owner if owner and owner not in lifted.values() else f"{owner or 'layer'}_{len(lifted)}".replace(".", "_")
    module = make(node, [_fetch(source, target) if target else None for target in key])
    if _has_submodule(root, name):
        # the container made for this owner's get_attr nodes: its other contents move onto the module
        container = root.get_submodule(name)
        for child_name, child in container._modules.items():
            module.add_module(child_name, child)
        held = set(module._buffers) | set(module._parameters)  # a graph may keep parameters as buffers
        for buffer_name, buffer in container._buffers.items():
            if buffer_name not in held:
                module.register_buffer(buffer_name, buffer)
        for parameter_name, parameter in container._parameters.items():
            if parameter_name not in held:
                module.register_parameter(parameter_name, parameter)
    _set_path(root, name, module)
    lifted[key] = name
    return name


def _as_parameter(tensor: torch.Tensor) -> nn.Parameter:
    return tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)


def _make_layer(node: fx.Node, tensors: list[Any]) -> nn.Module:
    weight, bias = tensors
    layer: nn.Module
    if node.target is torch.ops.aten.linear.default:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    else:
        args = list(node.args) + [None] * 7
        stride, padding, dilation, groups = (args[3] or 1), (args[4] or 0), (args[5] or 1), (args[6] or 1)
        layer = _CONV_TYPES[node.target](weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                                         stride=stride, padding=padding, dilation=dilation, groups=groups,
                                         bias=bias is not None, device="meta")
    layer.weight = _as_parameter(weight)
    if bias is not None:
        layer.bias = _as_parameter(bias)
    return layer


def _make_batch_norm(node: fx.Node, tensors: list[Any]) -> nn.Module:
    weight, bias, running_mean, running_var = tensors
    value = node.meta.get("val")
    rank = value.dim() if isinstance(value, torch.Tensor) else 4
    norm_type = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(rank, nn.BatchNorm2d)
    norm = norm_type(running_mean.shape[0], eps=float(node.args[7]), momentum=float(node.args[6]),
                     affine=weight is not None, device="meta")
    if weight is not None:
        norm.weight = _as_parameter(weight)
        norm.bias = _as_parameter(bias)
    norm.running_mean = running_mean
    norm.running_var = running_var
    norm.num_batches_tracked = torch.tensor(0)
    return norm.eval()


def _fetch(source: nn.Module, target: str) -> Any:
    value: Any = source
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _has_submodule(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def _set_path(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = _ensure_module(root, parent_path)
    parent.add_module(leaf, module)


def _ensure_module(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split(".") if path else []:
        child = module._modules.get(part)
        if child is None:
            child = nn.Module()
            module.add_module(part, child)
        module = child
    return module


def _copy_attribute(source: nn.Module, root: nn.Module, target: str) -> None:
    parent_path, _, leaf = target.rpartition(".")
    parent = _ensure_module(root, parent_path)
    if leaf in parent._parameters or leaf in parent._buffers or leaf in parent.__dict__:
        return
    value = _fetch(source, target)
    if isinstance(value, nn.Parameter):
        parent.register_parameter(leaf, value)
    elif isinstance(value, torch.Tensor):
        parent.register_buffer(leaf, value)
    else:
        setattr(parent, leaf, value)


def _unflatten_output(source: fx.GraphModule, leaves: list[Any]) -> Any:
    spec = getattr(source, "_out_spec", None)
    if spec is None or spec.type in (tuple, list):
        return tuple(leaves)
    if spec.is_leaf():
        return leaves[0]
    raise EngineError(f"exported models returning a {spec.type.__name__} are not supported; return tensors")


def _replace_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    if not path:
        raise EngineError("cannot skip the whole model")
    _set_path(root, path, module)


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


def _model_device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


@contextmanager
def _quiet_deprecations() -> Iterator[None]:
    # torch.ao warns on every call that it is moving to torchao; the table below is where that move happens.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*")
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        warnings.filterwarnings("ignore", message=".*grad attribute of a Tensor that is not a leaf.*")
        warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
        yield


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
    return {(scheme, kind): Backend(f"torchao.quantization.quantize_ ({scheme})", _torchao_cuda(scheme),
                                    "exported_program", ("torchao",))
            for scheme in ("int8_weight_only", "int8_dynamic", "int4_weight_only", "float8")}


BACKENDS: dict[tuple[str, ModelKind], Backend] = {
    ("dynamic_int8", "eager"): Backend("torch.ao.quantization.quantize_dynamic", _dynamic_int8_eager,
                                       "torchscript"),
    ("dynamic_int8", "torchscript"): Backend("torch.ao.quantization.quantize_dynamic_jit",
                                             _dynamic_int8_torchscript, "torchscript"),
    ("dynamic_int8", "graph"): Backend("torch.ao.quantization.quantize_dynamic on the lifted exported graph",
                                       _dynamic_int8_graph, "torchscript"),
    ("static_int8", "eager"): Backend("torch.ao.quantization.quantize_fx (x86 qconfig)", _static_int8_fx,
                                      "torchscript"),
    ("static_int8", "graph"): Backend("torch.ao.quantization.quantize_fx (x86 qconfig) on the lifted exported graph",
                                      _static_int8_graph, "torchscript"),
    **{("qat_int8", kind): Backend("torchao PT2E QAT (prepare_qat_pt2e, X86InductorQuantizer), then "
                                   "torch.ao.quantization.quantize_fx as static_int8", _qat_int8, "torchscript")
       for kind in ("eager", "graph")},
    **{("fp16", kind): Backend("torch (Module.to float16)", _half_precision(torch.float16))
       for kind in ("eager", "graph", "torchscript")},
    **{("bf16", kind): Backend("torch (Module.to bfloat16)", _half_precision(torch.bfloat16))
       for kind in ("eager", "graph", "torchscript")},
    **_cuda_backends("eager"),
    **_cuda_backends("graph"),
}


def backend_for(scheme: str, kind: ModelKind) -> Backend:
    """The backend that quantizes a `kind` model with `scheme`; EngineError if there is none."""
    backend = BACKENDS.get((scheme, kind))
    if backend is None:
        kinds = sorted(k for s, k in BACKENDS if s == scheme)
        if not kinds:
            raise EngineError(f"unknown quantization scheme {scheme!r}")
        raise EngineError(f"quantization scheme {scheme!r} cannot take a {kind} model; it takes {kinds}")
    return backend
