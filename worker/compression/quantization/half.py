"""fp16 / bf16: the model cast to half precision, wrapped so callers keep float32 in and out."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from worker.compression.base import EngineError, StageContext
from worker.compression.graph_lift import _replace_submodule, torch_level_module
from worker.compression.inputs import (
    Batch,
    ModelInputs,
    call_model,
    map_floating,
    select_output,
    torchscript_to_graph,
)
from worker.compression.quantization.plan import _Done, _model_device, _require_targets, plan_layers

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
        args = tuple(
            a.to(self.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in (x, *args)
        )
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
        output: torch.Tensor = self.inner(x).to(self.out_dtype)
        return output


def _half_precision(dtype: torch.dtype) -> Callable[[nn.Module, dict[str, Any], StageContext], _Done]:
    def run(model: nn.Module, options: dict[str, Any], ctx: StageContext) -> _Done:
        return _to_dtype(model, dtype, options, ctx)

    return run


def _to_dtype(model: nn.Module, dtype: torch.dtype, options: dict[str, Any], ctx: StageContext) -> _Done:
    scheme = "fp16" if dtype == torch.float16 else "bf16"
    out_dtype = _output_dtype(model, ctx.example_input)
    kind, info = ctx.kind, {"dtype": str(dtype).removeprefix("torch.")}
    example = ctx.example_input
    if kind == "torchscript" and isinstance(example, ModelInputs) and not example.kwargs:
        # a script wrapper takes one tensor; several (token ids and a mask) go through an exported program
        model, kind = torchscript_to_graph(model, ctx.signature, example), "graph"
        info["converted"] = "TorchScript -> exported program (torch._export.converter.TS2EPConverter)"
    if kind == "graph" and (options.get("skip_layers") or options.get("keep_first_last_float")):
        model = torch_level_module(model)  # skipped layers need to be submodule calls to be wrapped
    candidates = [
        name
        for name, module in model.named_modules()
        if name and any(p.is_floating_point() for p in module.parameters(recurse=False))
    ]
    plan = plan_layers(candidates, options)
    _require_targets(plan, candidates, "layers with floating-point parameters", scheme)
    if kind == "torchscript":
        if plan.skipped:
            raise EngineError(
                f"{scheme}: skip_layers is not supported for TorchScript models "
                "(their submodules cannot be wrapped); upload an eager model or drop skip_layers"
            )
        if isinstance(ctx.example_input, ModelInputs):
            raise EngineError(
                f"{scheme} on a TorchScript model takes models of one float input; this one takes "
                f"{ctx.example_input.describe()}: upload it as an exported program"
            )
        converted = copy.deepcopy(model).to(dtype)
        wrapped: nn.Module = torch.jit.script(_ScriptCastWrapper(converted, dtype, out_dtype))
    else:
        converted = copy.deepcopy(model).to(dtype)
        for name in sorted(plan.skipped, key=lambda n: -n.count(".")):  # innermost first
            # Skipped layers stay float32 and talk to their half-precision neighbours through casts.
            module = converted.get_submodule(name)
            _replace_submodule(converted, name, CastWrapper(module.float(), torch.float32, dtype))
        if kind == "graph":
            _retarget_float32(converted, dtype)
        wrapped = CastWrapper(converted, dtype, out_dtype)
    if not any(_has_dtype(converted, name, dtype) for name in plan.targets):
        raise EngineError(f"{scheme} changed no parameter to {dtype}")
    _run_or_explain(wrapped, ctx.example_input, scheme)
    return _Done(wrapped.eval(), kind, plan, info)


def _retarget_float32(graph_module: nn.Module, dtype: torch.dtype) -> None:
    """An exported graph spells out the float32 of its trace: `to(dtype=float32)` casts and dtype
    asserts (Hugging Face casts the position embeddings to the model's dtype). Run in `dtype`, those
    casts go to `dtype`, as the eager code would cast to its half-precision dtype, and the asserts go."""
    import torch.fx as fx

    if not isinstance(graph_module, fx.GraphModule):
        return
    aten = torch.ops.aten
    changed = False
    for node in list(graph_module.graph.nodes):
        if node.op != "call_function":
            continue
        if (
            node.target is aten._assert_tensor_metadata.default
            and node.kwargs.get("dtype") == torch.float32
            and not node.users
        ):
            graph_module.graph.erase_node(node)
            changed = True
        elif node.target in (aten.to.dtype_layout, aten._to_copy.default) and node.kwargs.get("dtype") == torch.float32:
            node.kwargs = {**node.kwargs, "dtype": dtype}
            changed = True
        elif node.target is aten.to.dtype and len(node.args) > 1 and node.args[1] == torch.float32:
            node.args = (node.args[0], dtype, *node.args[2:])
            changed = True
    if changed:
        graph_module.recompile()


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
        raise EngineError(
            f"{scheme}: the converted model does not run ({error}); it probably creates "
            "float32 tensors inside forward, so it cannot run in reduced precision"
        ) from error
