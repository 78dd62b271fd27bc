"""fp16 / bf16: the model cast to half precision, wrapped so callers keep float32 in and out."""

from __future__ import annotations

import copy
import dataclasses
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
)
from worker.compression.quantization.plan import _Done, _model_device, _require_targets, plan_layers
from worker.compression.torchscript_conversion import torchscript_to_graph

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
    kind = ctx.kind
    info: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch.")}
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
    retargeted: list[str] = []
    if kind == "torchscript":
        if plan.skipped:
            raise EngineError(
                f"{scheme}: skip_layers is not supported for TorchScript models "
                "(their submodules cannot be wrapped); upload an eager model or drop skip_layers"
            )
        converted = copy.deepcopy(model).to(dtype)
        if isinstance(ctx.example_input, ModelInputs):
            wrapped: nn.Module = _script_cast_named(converted, ctx.example_input, dtype, out_dtype, scheme)
        else:
            wrapped = torch.jit.script(_ScriptCastWrapper(converted, dtype, out_dtype))
        try:
            _run_or_explain(wrapped, ctx.example_input, scheme)
        except EngineError as error:
            return _via_exported_program(model, dtype, options, ctx, error)
    else:
        converted = copy.deepcopy(model).to(dtype)
        retargeted = _retarget_float32(converted, dtype) if kind == "graph" else []
        for name in sorted(plan.skipped, key=lambda n: -n.count(".")):  # innermost first
            # Skipped layers stay float32 and talk to their half-precision neighbours through casts.
            module = converted.get_submodule(name)
            _replace_submodule(converted, name, CastWrapper(module.float(), torch.float32, dtype))
        constants = ctx.signature is not None and bool(ctx.signature.kwargs)
        if kind == "graph" and constants and not plan.skipped and _cast_at_the_edges(converted, dtype):
            # CastWrapper's **kwargs cannot be exported with dynamic shapes; the program keeps its own
            # calling convention, constants by name included
            wrapped = converted
        else:
            wrapped = CastWrapper(converted, dtype, out_dtype)
    if not any(_has_dtype(converted, name, dtype) for name in plan.targets):
        raise EngineError(f"{scheme} changed no parameter to {dtype}")
    _run_or_explain(wrapped, ctx.example_input, scheme)
    if retargeted:
        info["float32_ops_retargeted"] = retargeted
    if wrapped is converted:
        return _Done(wrapped, kind, plan, info)
    return _Done(wrapped.eval(), kind, plan, info)


_aten = torch.ops.aten


def _cast_at_the_edges(model: nn.Module, dtype: torch.dtype) -> bool:
    """Cast an exported graph's floating inputs to `dtype` and its floating outputs back to their own
    dtypes, in the graph itself; False (nothing changed) when the graph does not record its dtypes."""
    import torch.fx as fx

    if not isinstance(model, fx.GraphModule):
        return False
    graph = model.graph
    output = next(node for node in reversed(graph.nodes) if node.op == "output")
    leaves = [leaf for leaf in _nodes_in(output.args[0])]
    if not all(isinstance(leaf.meta.get("val"), torch.Tensor) for leaf in leaves):
        return False
    for node in [n for n in graph.nodes if n.op == "placeholder"]:
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        with graph.inserting_after(node):
            cast = graph.call_function(_aten._to_copy.default, (node,), {"dtype": dtype})
        # shape guards read the input as it came
        node.replace_all_uses_with(
            cast, delete_user_cb=lambda user, cast=cast: user is not cast and user.op != "call_module"
        )
    back: dict[fx.Node, fx.Node] = {}
    for leaf in leaves:
        original = leaf.meta["val"].dtype
        if original.is_floating_point and leaf not in back:
            with graph.inserting_before(output):
                back[leaf] = graph.call_function(_aten._to_copy.default, (leaf,), {"dtype": original})
    output.args = (fx.node.map_arg(output.args[0], lambda node: back.get(node, node)),)
    model.recompile()
    return True


def _nodes_in(value: Any) -> list[Any]:
    import torch.fx as fx

    found: list[Any] = []
    fx.node.map_arg(value, found.append)
    return found


# casts whose target dtype is an argument (positional index), as torch.export writes `.float()` / `.to(...)`
_CAST_DTYPE_ARG = {_aten.to.dtype: 1, _aten._to_copy.default: None, _aten.to.dtype_layout: None}


def _retarget_float32(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Make the graph's float32 tensors in `dtype`: factory ops (zeros, ones, full, arange, ...) and
    casts to float32, which an export records from the float model's dtype (an LSTM's zero initial
    state, `x.to(weight.dtype)`) and which would otherwise meet half-precision weights in a matmul.

    Returns the rewritten nodes' names (a graph that upcasts on purpose now runs those ops in `dtype`).
    """
    import torch.fx as fx

    if not isinstance(model, fx.GraphModule):
        return []
    changed = []
    for node in list(model.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is _aten._assert_tensor_metadata.default and node.kwargs.get("dtype") == torch.float32:
            # the trace's dtype asserts (Hugging Face casts position embeddings to the model's dtype)
            if not node.users:
                model.graph.erase_node(node)
                changed.append(node.name)
            continue
        position = _CAST_DTYPE_ARG.get(node.target)
        if position is not None and len(node.args) > position and node.args[position] == torch.float32:
            node.args = (*node.args[:position], dtype, *node.args[position + 1 :])
            changed.append(node.name)
        elif node.kwargs.get("dtype") == torch.float32:
            node.kwargs = {**node.kwargs, "dtype": dtype}
            changed.append(node.name)
    if changed:
        model.recompile()
    return changed


def _via_exported_program(
    model: nn.Module, dtype: torch.dtype, options: dict[str, Any], ctx: StageContext, error: EngineError
) -> _Done:
    """fp16 of a TorchScript model that makes float32 tensors inside forward (a traced LSTM's zero
    state): converted to an exported program, whose float32 factory ops can be retargeted."""
    from worker.compression.torchscript_conversion import torchscript_to_graph

    try:
        graph = torchscript_to_graph(model, ctx.signature, ctx.example_input)
    except EngineError:
        raise error from None  # the conversion's failure would hide why fp16 did not run
    done = _to_dtype(graph, dtype, options, dataclasses.replace(ctx, kind="graph"))
    done.info["converted"] = (
        "the TorchScript model makes float32 tensors inside forward, so it was converted to an exported "
        "program (torch._export.converter.TS2EPConverter) whose float32 ops could be made half precision"
    )
    return done


def _script_cast_named(
    inner: nn.Module, example: ModelInputs, dtype: torch.dtype, out_dtype: torch.dtype, scheme: str
) -> nn.Module:
    """_ScriptCastWrapper for a TorchScript forward of several named inputs and constants
    (`forward(input_ids, attention_mask)`, `forward(x, sr: int)`): a scripted wrapper of that
    signature casts the floating inputs in and the floating outputs (a tensor or a tuple) back."""
    from worker.compression.script_wrapper import script_forward

    returns = inner.forward.schema.returns  # type: ignore[attr-defined]  # a ScriptModule's method has a schema
    output = str(returns[0].type) if len(returns) == 1 else ""
    width = output.removeprefix("Tuple[").removesuffix("]").split(", ") if output.startswith("Tuple[") else []
    if output != "Tensor" and (not width or any(kind != "Tensor" for kind in width)):
        raise EngineError(
            f"{scheme} on a TorchScript model with several inputs handles outputs of a tensor or a tuple "
            f"of tensors; this forward returns {output or 'several values'}: upload it as an exported program"
        )
    target, back = f"torch.{str(dtype).removeprefix('torch.')}", f"torch.{str(out_dtype).removeprefix('torch.')}"
    names = list(example.names)
    lines = [f"        {name} = {name}.to({target}) if {name}.is_floating_point() else {name}\n" for name in names]
    call = ", ".join([*names, *(f"{name}={name}" for name in example.kwargs)])
    lines.append(f"        out = self.inner({call})\n")
    if output == "Tensor":
        lines.append(f"        return out.to({back}) if out.is_floating_point() else out\n")
    else:
        items = [f"out[{i}].to({back}) if out[{i}].is_floating_point() else out[{i}]" for i in range(len(width))]
        lines.append(f"        return ({', '.join(items)}{',' if len(items) == 1 else ''})\n")
    return script_forward(inner, names, example.kwargs, "".join(lines))


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
