"""dynamic_int8: torch.ao.quantization.quantize_dynamic on eager and lifted graphs, quantize_dynamic_jit on
TorchScript."""

from __future__ import annotations

import copy
import io
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from worker.compression import breadcrumbs
from worker.compression.base import EngineError, StageContext
from worker.compression.graph_lift import torch_level_module
from worker.compression.quantization.plan import (
    _check_swapped,
    _Done,
    _is_quantized_module,
    _require_targets,
    plan_layers,
)

# --------------------------------------------------------------------------- dynamic int8


_DYNAMIC_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell, nn.RNNCell)
_DYNAMIC_WHAT = "Linear / LSTM / GRU layers"


def _dynamic_int8_eager(model: nn.Module, options: dict[str, Any], ctx: StageContext) -> _Done:
    from torch.ao.quantization import float_qparams_weight_only_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    model = linears_for_conv1d(model)
    # Exact types: subclasses such as MultiheadAttention's out_proj are not swapped by quantize_dynamic.
    candidates = [name for name, module in model.named_modules() if name and type(module) in _DYNAMIC_TYPES]
    plan = plan_layers(candidates, options)
    _require_targets(plan, candidates, _DYNAMIC_WHAT, "dynamic_int8")
    qconfig: dict[str, Any] = {name: per_channel_dynamic_qconfig for name in plan.targets}
    embeddings = _embedding_targets(model, options)
    qconfig.update({name: float_qparams_weight_only_qconfig for name in embeddings})
    breadcrumbs.operation("dynamic_int8: quantize_dynamic")
    quantized = quantize_dynamic(model, qconfig, dtype=torch.qint8, inplace=False)  # type: ignore[no-untyped-call]  # torch leaves this unannotated
    _check_swapped(quantized, plan, "dynamic_int8")
    info: dict[str, Any] = {}
    if options.get("quantize_embeddings"):
        modules = dict(quantized.named_modules())
        info["quantized_embeddings"] = [name for name in embeddings if _is_quantized_module(modules[name])]
    return _Done(quantized.eval(), "eager", plan, info)


def linears_for_conv1d(model: nn.Module) -> nn.Module:
    """`model`, or a copy in which every Hugging Face `Conv1D` is the `nn.Linear` it computes.

    GPT-2 (and GPT, CTRL ...) hold their attention and MLP weights in transformers' Conv1D,
    `x @ weight + bias` with the weight stored [in, out]: most of the model, and no type
    torch.ao knows, so quantize_dynamic would leave all of it float. As nn.Linear (the weight
    transposed, the same numbers) it is quantized like any other. The caller's model is left as it is.
    """
    if not any(_is_hf_conv1d(module) for module in model.modules()):
        return model
    model = copy.deepcopy(model)  # keeps tied weights tied
    for name, module in list(model.named_modules()):
        if not _is_hf_conv1d(module):
            continue
        weight = module.weight.detach()
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=module.bias is not None, device=weight.device)
        linear = linear.to(weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight.t())
            if module.bias is not None:
                linear.bias.copy_(module.bias.detach())
        parent_name, _, leaf = name.rpartition(".")
        model.get_submodule(parent_name).add_module(leaf, linear.train(module.training))
    return model


def _is_hf_conv1d(module: nn.Module) -> bool:
    kind = type(module)
    return kind.__name__ == "Conv1D" and kind.__module__.startswith("transformers.")


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
        raise EngineError(
            "quantize_embeddings needs an eager model or an exported program: the TorchScript "
            "path (quantize_dynamic_jit) quantizes Linear only"
        )
    kinds = {name: _script_type_name(module) for name, module in model.named_modules() if name}
    candidates = [name for name, kind in kinds.items() if kind == "Linear"]
    plan = plan_layers(candidates, options)
    plan.left_float.update(
        {
            name: "the TorchScript path (quantize_dynamic_jit) quantizes Linear only"
            for name, kind in kinds.items()
            if kind in ("LSTM", "GRU", "RNN")
        }
    )
    plan.left_float.update(
        {
            name: "a Hugging Face Conv1D (an addmm) is no Linear to the TorchScript path (quantize_dynamic_jit); "
            "an exported program or the save_pretrained folder gets it quantized"
            for name, kind in kinds.items()
            if kind == "Conv1D"
        }
    )
    qconfig: dict[str, Any] = {"": per_channel_dynamic_qconfig, **{name: None for name in plan.skipped}}
    working = _fresh_script_copy(model)
    _isolate_control_flow_outputs(working)
    quantized = quantize_dynamic_jit(working.eval(), qconfig, inplace=True)  # type: ignore[no-untyped-call]  # torch leaves this unannotated
    ops = count_quantized_ops(quantized)
    if ops == 0:
        _require_targets(plan, candidates, "Linear layers", "dynamic_int8")  # names the usual cause
        raise EngineError(
            "dynamic_int8 left no quantized op in this TorchScript model (the TorchScript "
            "path covers Linear only), so it would change nothing"
        )
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
    copy: torch.jit.ScriptModule = torch.jit.load(buffer, map_location="cpu")  # type: ignore[no-untyped-call]  # torch leaves this unannotated
    return copy


def _isolate_control_flow_outputs(model: torch.jit.ScriptModule) -> None:
    """Route every tensor leaving an if/loop through aten::clone, in all methods of all submodules.

    The JIT dynamic-quant pass places the observer of a Linear input that comes
    straight out of a prim::If before the If itself, and finalizing then fails with
    "Graph::copy() encountered a use of a value ... not in scope" (torch 2.13).
    A clone gives the observer an ordinary value to sit on.
    """
    for module in model.modules():
        assert isinstance(module, torch.jit.ScriptModule)  # every submodule of a loaded ScriptModule is one
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
