"""TorchScript uploads as exported programs: torch's TorchScript -> ExportedProgram converter
(`torch._export.converter.TS2EPConverter`), with the job's constant arguments inlined first and the
converted program checked against the TorchScript model on the same inputs.

The eager-only schemes (static int8, structured pruning, encode, ...) reach TorchScript uploads
through `torchscript_to_graph`; a failure names the operation the converter could not translate.
"""

from __future__ import annotations

import io
import re
from typing import Any

import torch
from torch import Tensor, nn

from worker.compression.base import EngineError
from worker.compression.inputs import (
    MIN_DYNAMIC_SIZE,
    Batch,
    Signature,
    _last_line,
    as_call,
    batch_of,
    call_model,
    output_leaves,
    positional_with_constants,
)


def torchscript_to_graph(model: nn.Module, signature: Signature | None, inputs: Batch) -> nn.Module:
    """Convert a ScriptModule to an exported program's module with torch's TorchScript converter.

    EngineError naming the operation the converter could not translate, so the user can
    upload an exported program or a state_dict instead.
    """
    from torch._export.converter import TS2EPConverter

    assert isinstance(model, torch.jit.ScriptModule)  # only TorchScript models are converted here
    example = batch_of(inputs, MIN_DYNAMIC_SIZE)
    args = positional_with_constants(model, example)
    _, constants = as_call(example)
    source = _with_constants_inlined(model, constants) if constants else model
    try:
        program = TS2EPConverter(source, args[: len(args) - len(constants)]).convert()
    except Exception as error:
        raise EngineError(
            f"this TorchScript model could not be converted to an exported program "
            f"(torch._export.converter.TS2EPConverter): {_converter_failure(error)}; upload it as an "
            "exported program (torch.export.save) or a state_dict with its architecture"
        ) from error
    graph = program.module()
    if constants:
        _accept_constants(graph, constants)
    _name_convolutions(graph)
    _inline_scalar_constants(graph)
    _restore_parameters(graph, {name for name, _ in model.named_parameters()})
    try:
        with torch.no_grad():
            expected, got = call_model(model, example), call_model(graph, example)
        _compare_outputs(expected, got)
    except EngineError:
        raise
    except Exception as error:
        raise EngineError(
            f"the exported program converted from this TorchScript model does not run like it: {_last_line(error)}"
        ) from error
    return graph


def _with_constants_inlined(model: torch.jit.ScriptModule, constants: dict[str, Any]) -> torch.jit.ScriptModule:
    """A copy of `model` whose forward graph has the constant arguments (`sr=16000`) as constants.

    The converter traces every argument as a tensor, so an int that forward turns into a float
    (`float(sr)`) fails there; inlined and constant-propagated, it leaves no op behind. The job's
    forward_kwargs are the values the model is always called with, so specialising on them loses nothing.
    """
    buffer = io.BytesIO()
    torch.jit.save(model, buffer)  # a copy with method graphs of its own to rewrite
    buffer.seek(0)
    copy: Any = torch.jit.load(buffer, map_location="cpu")
    graph: Any = copy.graph  # torch._C.Graph: its stubs lack insertConstant
    names = [argument.name for argument in copy.forward.schema.arguments]
    values = list(graph.inputs())  # `self` first, in the schema's order
    with graph.insert_point_guard(next(iter(graph.nodes()))):
        for name in reversed(names):  # erased from the end, so the earlier positions stay valid
            if name not in constants:
                continue
            position = names.index(name)
            values[position].replaceAllUsesWith(graph.insertConstant(constants[name]))
            graph.eraseInput(position)
    torch._C._jit_pass_constant_propagation(graph)
    return copy


def _accept_constants(graph: nn.Module, constants: dict[str, Any]) -> None:
    """Let the converted program be called as the model is, with the constants as keyword arguments.

    The converted graph takes the tensors only; an unused placeholder per constant, added to its
    input spec, keeps `call_model(graph, inputs)` and a later torch.export (which specialises on
    the constant's value) working like the TorchScript model's call.
    """
    import torch.fx as fx
    import torch.utils._pytree as pytree
    from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

    assert isinstance(graph, fx.GraphModule)  # an exported program's .module()
    codegen = graph.graph._codegen
    assert isinstance(codegen, _PyTreeCodeGen)  # exported programs' modules take pytree inputs
    placeholders = [node for node in graph.graph.nodes if node.op == "placeholder"]
    with graph.graph.inserting_after(placeholders[-1]):
        for name in reversed(list(constants)):
            graph.graph.placeholder(name)
    info = codegen.pytree_info
    in_spec = pytree.tree_flatten((tuple(range(len(placeholders))), dict(constants)))[1]
    codegen.pytree_info = _PyTreeInfo([*info.orig_args, *constants], in_spec, info.out_spec)
    graph._in_spec = in_spec
    graph.recompile()


def constants_by_name(graph: nn.Module, signature: Signature | None) -> None:
    """Let an exported program that took the constants positionally (`export(model, (x, 16000))`)
    be called the engine's way, `graph(x, sr=16000)`: its input spec takes them by name instead.

    The program still checks each value it was specialised on; nothing changes when the program
    already takes them by name or when its argument names differ from the declared constants.
    """
    import torch.fx as fx
    import torch.utils._pytree as pytree
    from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

    if signature is None or not signature.kwargs or not isinstance(graph, fx.GraphModule):
        return
    codegen = graph.graph._codegen
    spec = getattr(graph, "_in_spec", None)
    if not isinstance(codegen, _PyTreeCodeGen) or spec is None or spec.num_children != 2:
        return
    positional, keywords = spec.children()
    tensors, names = len(signature.inputs), list(signature.kwargs)
    trailing = list(codegen.pytree_info.orig_args[tensors:])
    if keywords.num_children or positional.num_children != tensors + len(names) or trailing != names:
        return
    in_spec = pytree.tree_flatten((tuple(range(tensors)), dict(signature.kwargs)))[1]
    info = codegen.pytree_info
    codegen.pytree_info = _PyTreeInfo(info.orig_args, in_spec, info.out_spec)
    graph._in_spec = in_spec
    graph.recompile()


def _restore_parameters(graph: nn.Module, names: set[str]) -> None:
    """The converter keeps the ScriptModule's parameters as plain tensors; make them parameters
    again, so counting, pruning and fine-tuning see the weights as they see an exported program's."""
    for name in names:
        owner_path, _, leaf = name.rpartition(".")
        try:
            owner = graph.get_submodule(owner_path) if owner_path else graph
        except AttributeError:
            continue
        value = owner._buffers.get(leaf)
        if value is None or not value.is_floating_point():
            continue
        del owner._buffers[leaf]
        owner.register_parameter(leaf, nn.Parameter(value, requires_grad=True))


def _converter_failure(error: BaseException) -> str:
    """The op the converter stopped at and why, from its error (whose last line is advice on logging)."""
    text = str(error)
    where = re.search(r"While executing %\S+ : .*?target=(?:torch\.ops\.)?([\w.]+)\]", text)
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    if where is None:
        return _last_line(error)
    reason = "a size computed from tensor values" if "data-dependent" in first else first[:200]
    return f"{where.group(1)} takes {reason}"


def _inline_scalar_constants(graph: nn.Module) -> None:
    """Put the converter's 0-dim double constants back as the Python numbers they were written as.

    TorchScript keeps `x * 0.5` as a multiplication by a float64 0-dim tensor (GPT-2's GELU has
    four); as a tensor operand, static int8 observes and quantizes it, and int8 has no double.
    """
    import torch.fx as fx

    if not isinstance(graph, fx.GraphModule):
        return
    aten = torch.ops.aten
    arithmetic = (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor)
    changed = False
    for node in graph.graph.nodes:
        if node.op != "get_attr":
            continue
        value = graph
        for part in str(node.target).split("."):
            value = getattr(value, part)
        if not isinstance(value, Tensor) or isinstance(value, nn.Parameter) or value.dim() != 0:
            continue
        if value.dtype != torch.float64:
            continue
        for user in list(node.users):
            # only as the second operand: the first is the tensor the result takes its dtype from
            if (
                user.op == "call_function"
                and user.target in arithmetic
                and user.args[1:2] == (node,)
                and not user.kwargs
            ):
                user.args = (user.args[0], float(value), *user.args[2:])
                changed = True
    if changed:
        graph.graph.eliminate_dead_code()
        graph.recompile()


def _name_convolutions(graph: nn.Module) -> None:
    """Rewrite the converter's generic `aten.convolution` calls as `aten.conv1d/2d/3d`, the form
    torch.export writes and the engine's graph lifters (quantization, pruning) recognise."""
    import torch.fx as fx

    if not isinstance(graph, fx.GraphModule):
        return
    aten = torch.ops.aten
    by_rank = {1: aten.conv1d.default, 2: aten.conv2d.default, 3: aten.conv3d.default}
    changed = False
    for node in graph.graph.nodes:
        if node.op != "call_function" or node.target is not aten.convolution.default or node.kwargs:
            continue
        source, weight, bias, stride, padding, dilation, transposed, _output_padding, groups = node.args
        if transposed or len(stride) not in by_rank:
            continue
        node.target = by_rank[len(stride)]
        node.args = (source, weight, bias, stride, padding, dilation, groups)
        changed = True
    if changed:
        graph.recompile()


def _compare_outputs(expected: Any, got: Any) -> None:
    left, right = output_leaves(expected), output_leaves(got)
    if [k for k, _ in left] != [k for k, _ in right] and len(left) != len(right):
        raise EngineError(f"the converted program returns {len(right)} tensors, the TorchScript model {len(left)}")
    for (name, a), (_, b) in zip(left, right):
        if a.shape != b.shape or not torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4):
            raise EngineError(f"the converted program's output {name} differs from the TorchScript model's")


# ---------------------------------------------------------------- outputs
