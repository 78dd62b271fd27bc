"""The one lifter from an exported program's graph back to torch-level nn modules.

An exported program's `.module()` keeps parameters on plain container modules and calls aten ops
on them; eager-mode tools (quantize_dynamic, FX quantization, torchao, torch.jit.trace) and
torch-pruning's dependency graph need real layers. `lift_graph` rebuilds the graph as a new
fx.GraphModule in which aten linear / convolution / batch_norm (and optionally layer_norm) calls on
stored parameters become calls of nn.Linear / nn.ConvNd / nn.BatchNormNd / nn.LayerNorm submodules
that hold the same tensors, named after their parameters' owner ("fc1", "features.0").

Its two users differ only in the parameters they pass:
- quantization, codebook, smoothquant, sensitivity and qat call `torch_level_module`: common aten
  ops become their torch functions, a parameter several ops share becomes one layer called at
  each use, and the rebuilt graph has plain positional inputs and outputs, so FX can trace it again.
- pruning's ln_structured calls `lift_exported_graph`: layer_norm is lifted too, only a container
  that holds exactly one op's parameters becomes a layer, reshapes that flatten all but the batch
  dimension become flatten(1) (so they keep working when channels go away), every parameter must
  end up in a layer, and the exported calling convention (pytree inputs and outputs) is kept.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from worker.compression.base import EngineError
from worker.compression.graph_lift_recurrent import call_recurrent, recurrent_layer
from worker.compression.module_paths import copy_attribute, fetch, has_submodule, set_path

_aten = torch.ops.aten
# each class takes a kernel size of its own rank, which one static type cannot say
_CONV_OPS: dict[Any, Callable[..., nn.Module]] = {
    _aten.conv1d.default: nn.Conv1d,
    _aten.conv2d.default: nn.Conv2d,
    _aten.conv3d.default: nn.Conv3d,
    _aten.conv1d.padding: nn.Conv1d,
    _aten.conv2d.padding: nn.Conv2d,
    _aten.conv3d.padding: nn.Conv3d,
}
_BATCH_NORM_BY_RANK = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_RESHAPE_OPS = (_aten.view.default, _aten.reshape.default, _aten._unsafe_view.default)
_SIMPLE_CALLS: dict[Any, Callable[..., Any]] = {
    _aten.relu.default: F.relu,
    _aten.relu_.default: F.relu,
    _aten.sigmoid.default: torch.sigmoid,
    _aten.tanh.default: torch.tanh,
    _aten.flatten.using_ints: torch.flatten,
    _aten.view.default: torch.reshape,
    _aten.reshape.default: torch.reshape,
    _aten.cat.default: torch.cat,
    _aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
    _aten.mean.dim: torch.mean,
    _aten.permute.default: torch.permute,
    _aten.transpose.int: torch.transpose,
    _aten.add.Tensor: operator.add,
    _aten.mul.Tensor: operator.mul,
}


def torch_level_module(graph_module: nn.Module) -> fx.GraphModule:
    """An exported program's `.module()` as a torch-level fx.GraphModule, for eager-mode tooling.

    Ops without a translation are kept as aten calls; they run in float. The input-shape guards
    of the exported program are dropped.

    Example:
        >>> eager = torch_level_module(torch.export.load("model.pt2").module())
    """
    return lift_graph(graph_module, translate_ops=True)


def lift_exported_graph(graph_module: fx.GraphModule) -> fx.GraphModule:
    """An equivalent graph module whose conv / linear / norm ops are nn modules torch-pruning can trace.

    Raises EngineError when a parameter is used by an op it cannot lift, since pruning around it
    would leave shapes that no longer fit.

    Example:
        >>> lifted = lift_exported_graph(torch.export.export(model, (x,)).module())
    """
    return lift_graph(
        graph_module,
        layer_norm=True,
        sole_owners_only=True,
        flatten_reshapes=True,
        every_parameter_lifted=True,
        keep_export_form=True,
    )


def lift_graph(
    graph_module: nn.Module,
    *,
    layer_norm: bool = False,
    translate_ops: bool = False,
    sole_owners_only: bool = False,
    flatten_reshapes: bool = False,
    every_parameter_lifted: bool = False,
    keep_export_form: bool = False,
) -> fx.GraphModule:
    """Rebuild `graph_module` (an exported program's `.module()`) with its layers as nn modules.

    Args:
        layer_norm: lift aten.layer_norm too (linear, convolution and eval-mode batch_norm always are).
        translate_ops: common aten ops become their torch functions (relu, reshape, pools, sym_size ...).
        sole_owners_only: lift an op only when a plain container holds exactly its parameters and
            nothing else uses them; otherwise parameters shared by several ops become one layer.
        flatten_reshapes: a view/reshape from (batch, ...) to (batch, rest) becomes flatten(1).
        every_parameter_lifted: raise EngineError when a parameter is still read by an aten op.
        keep_export_form: keep the exported pytree inputs and outputs (a dict output stays a dict)
            and each node's meta; otherwise inputs are positional and outputs a tensor or a tuple.
    """
    if not isinstance(graph_module, fx.GraphModule):
        raise EngineError("a graph-kind model must be the .module() of an exported program")
    uses: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        if node.op == "get_attr":
            uses[node.target] = uses.get(node.target, 0) + len(node.users)
    root = nn.Module()
    graph = fx.Graph()
    if keep_export_form:
        graph._codegen = copy.deepcopy(graph_module.graph._codegen)
    env: dict[fx.Node, Any] = {}
    lifted: dict[tuple[str, ...], str] = {}  # targets of the parameters -> submodule name

    def arg(value: Any) -> Any:
        return fx.node.map_arg(value, lambda node: env[node])

    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder(node.name)
            if keep_export_form:
                env[node].meta = dict(node.meta)
        elif node.op == "get_attr":
            copy_attribute(graph_module, root, node.target)
            env[node] = graph.get_attr(node.target)
        elif node.op == "call_module":
            if node.target == "_guards_fn" or not node.users:
                continue  # shape guards of the export; nothing reads them
            raise EngineError(f"unexpected submodule call {node.target!r} in the exported graph")
        elif node.op == "call_function":
            recurrent = recurrent_layer(graph_module, node) if translate_ops else None
            if recurrent is not None:
                env[node] = call_recurrent(graph, root, node, recurrent, arg)
                continue
            layer = _layer_parameters(node, layer_norm, addmm=translate_ops)
            if layer is not None and sole_owners_only and _sole_owner(graph_module, layer, uses) is None:
                layer = None
            if layer is not None:
                name = _lift(graph_module, root, node, lifted, layer)
                source = node.args[1] if node.target is _aten.addmm.default else node.args[0]
                env[node] = graph.call_module(name, (arg(source),))
            elif flatten_reshapes and node.target in _RESHAPE_OPS and _flattens_to_batch(node):
                env[node] = graph.call_function(_aten.flatten.using_ints, (arg(node.args[0]), 1))
            elif translate_ops:
                env[node] = _translate_call(graph, node, arg)
            else:
                env[node] = graph.call_function(node.target, arg(node.args), arg(dict(node.kwargs)))
            if keep_export_form:
                env[node].meta = dict(node.meta)
        elif node.op == "output":
            if keep_export_form:
                graph.output(arg(node.args[0]))
            else:
                leaves = list(node.args[0]) if isinstance(node.args[0], (tuple, list)) else [node.args[0]]
                graph.output(_unflatten_output(graph_module, [arg(leaf) for leaf in leaves]))
        else:
            raise EngineError(f"unsupported node {node.op} in the exported graph")
    rebuilt = fx.GraphModule(root, graph, class_name="TorchLevelModule")
    rebuilt.graph.eliminate_dead_code()  # the get_attr nodes of lifted parameters (needs the owning module)
    _detach_shared_reads(rebuilt, set(lifted.values()))
    # Copied again once they are gone: parameters now held by a lifted layer do not stay a second time
    # under their old names, and submodules are registered in the order the forward calls them (the
    # last one is the classifier that select_layers leaves out).
    rebuilt = fx.GraphModule(rebuilt, rebuilt.graph, class_name="TorchLevelModule")
    if every_parameter_lifted:
        _refuse_unlifted_parameters(rebuilt.graph, rebuilt)
    if keep_export_form:
        # the pytree code reads the input and output specs off the module
        for name in ("_in_spec", "_out_spec"):
            if hasattr(graph_module, name):
                setattr(rebuilt, name, getattr(graph_module, name))
    rebuilt.recompile()
    return rebuilt.eval()


def _detach_shared_reads(rebuilt: fx.GraphModule, layers: set[str]) -> None:
    """Point get_attr reads of a lifted layer's tensors at a root attribute holding the same tensor.

    A tied weight (GPT-2's LM head and token embedding) becomes the Linear layer, yet the
    embedding still reads it as `transformer.wte.weight`; once quantization swaps the layer that
    name is a packed int8 module's method. Read from the root, the embedding keeps the float tensor.
    """
    for node in rebuilt.graph.nodes:
        if node.op != "get_attr":
            continue
        owner, _, attribute = str(node.target).rpartition(".")
        if owner not in layers:
            continue
        flat = str(node.target).replace(".", "_")
        while hasattr(rebuilt, flat) and fetch(rebuilt, flat) is not fetch(rebuilt, str(node.target)):
            flat += "_"
        value = fetch(rebuilt, str(node.target))
        if isinstance(value, nn.Parameter):
            rebuilt.register_parameter(flat, value)
        else:
            rebuilt.register_buffer(flat, value)
        node.target = flat


def _layer_parameters(node: fx.Node, layer_norm: bool, addmm: bool = False) -> dict[str, fx.Node | None] | None:
    """The stored tensors a liftable layer op reads, by the nn module's attribute name; None if it is none.

    With `addmm`, `addmm(bias, x, weight)` on stored tensors (Hugging Face's Conv1D, GPT-2's
    projections) is a layer too: the nn.Linear it computes, its weight transposed.
    """
    target = node.target
    args: list[Any] = list(node.args) + [None] * 9
    kwargs: dict[str, Any] = dict(node.kwargs)
    tensors: dict[str, Any]
    if target is _aten.addmm.default:
        if not addmm or kwargs or not _is_matrix(args[2]) or not _is_matrix(args[1]):
            return None
        tensors = {"weight": args[2], "bias": args[0]}
    elif target is _aten.linear.default or target in _CONV_OPS:
        tensors = {"weight": args[1], "bias": args[2] if args[2] is not None else kwargs.get("bias")}
    elif target is _aten.batch_norm.default and not args[5]:  # eval mode only: training updates the stats
        tensors = {"weight": args[1], "bias": args[2], "running_mean": args[3], "running_var": args[4]}
        if tensors["running_mean"] is None or _rank(node) not in _BATCH_NORM_BY_RANK:
            return None
    elif target is _aten.layer_norm.default and layer_norm:
        tensors = {"weight": args[2], "bias": args[3]}
    else:
        return None
    if tensors["weight"] is None and target is not _aten.batch_norm.default:
        return None
    for value in tensors.values():
        if value is not None and not (isinstance(value, fx.Node) and value.op == "get_attr"):
            return None  # computed, not stored, parameters stay an aten call
    return tensors


def _sole_owner(root: fx.GraphModule, tensors: dict[str, fx.Node | None], uses: dict[str, int]) -> str | None:
    """The plain container that owns exactly these tensors, each read by this one op only; else None."""
    owners = set()
    for name, node in tensors.items():
        if node is None:
            continue
        target = node.target
        if not isinstance(target, str) or uses.get(target, 0) != 1:
            return None
        owner, _, attribute = target.rpartition(".")
        if attribute != name or not owner:
            return None
        owners.add(owner)
    if len(owners) != 1 or tensors.get("weight") is None:
        return None
    owner = owners.pop()
    container = root.get_submodule(owner)
    held = set(container._parameters) | set(container._buffers)
    if (
        type(container) is not nn.Module
        or any(True for _ in container.children())
        or not held <= set(tensors) | {"num_batches_tracked"}
    ):
        return None
    return owner


def _lift(
    source: fx.GraphModule,
    root: nn.Module,
    node: fx.Node,
    lifted: dict[tuple[str, ...], str],
    tensors: dict[str, fx.Node | None],
) -> str:
    """Put a module that owns the node's parameters on `root`; return its name (one module per parameter set)."""
    key = tuple(str(t.target) if t is not None else "" for t in tensors.values())
    if key in lifted:
        return lifted[key]
    first = key[0] or next((k for k in key if k), "")
    owner, _, weight_name = first.rpartition(".")
    # "attn.in_proj_weight" -> layer "attn.in_proj": on "attn", a module swap would drop attn.out_proj
    stem = weight_name.removesuffix("weight").rstrip("_")
    owner = ".".join(part for part in (owner, stem) if part)
    name = owner if owner and owner not in lifted.values() else f"{owner or 'layer'}_{len(lifted)}".replace(".", "_")
    values = {attribute: fetch(source, str(t.target)) for attribute, t in tensors.items() if t is not None}
    module = _make_layer(node, values)
    if has_submodule(root, name):
        # the container made for this owner's get_attr nodes: its other contents move onto the module
        container = root.get_submodule(name)
        for child_name, child in container._modules.items():
            module.add_module(child_name, child)
        held = set(module._buffers) | set(module._parameters)  # a graph may keep parameters as buffers
        for buffer_name, buffer in container._buffers.items():
            if buffer_name not in held:
                module.register_buffer(buffer_name, buffer)
            elif buffer_name == "num_batches_tracked" and buffer is not None:
                module.register_buffer(buffer_name, buffer)
        for parameter_name, parameter in container._parameters.items():
            if parameter_name not in held:
                module.register_parameter(parameter_name, parameter)
    set_path(root, name, module)
    lifted[key] = name
    return name


def _make_layer(node: fx.Node, values: dict[str, Any]) -> nn.Module:
    """The nn module `node` stands for, holding `values` (weight, bias, running stats) as they are."""
    target = node.target
    args: list[Any] = list(node.args) + [None] * 9
    kwargs: dict[str, Any] = dict(node.kwargs)
    weight: Any = values.get("weight")
    module: nn.Module
    if target is _aten.addmm.default:
        # Conv1D stores [in, out]; the copy is the only one the lifted module keeps
        values = {**values, "weight": weight.detach().t().contiguous()}
        module = nn.Linear(weight.shape[0], weight.shape[1], bias="bias" in values, device="meta")
    elif target is _aten.linear.default:
        module = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in values, device="meta")
    elif target in _CONV_OPS:
        names = ("stride", "padding", "dilation", "groups")
        conv_args = {k: kwargs.get(k, v) for k, v in zip(names, args[3:7]) if kwargs.get(k, v)}
        groups = int(conv_args.pop("groups", 1))
        conv_args = {k: v if isinstance(v, str) else tuple(v) for k, v in conv_args.items()}
        module = _CONV_OPS[target](
            weight.shape[1] * groups,
            weight.shape[0],
            tuple(weight.shape[2:]),
            groups=groups,
            bias="bias" in values,
            device="meta",
            **conv_args,
        )
    elif target is _aten.batch_norm.default:
        module = _BATCH_NORM_BY_RANK[_rank(node) or 4](
            values["running_mean"].shape[0],
            eps=float(args[7]),
            momentum=float(args[6]),
            affine=weight is not None,
            device="meta",
        )
        module.num_batches_tracked = torch.tensor(0)
    else:
        module = nn.LayerNorm(
            list(args[1]), eps=float(args[4] if args[4] is not None else 1e-5), bias="bias" in values, device="meta"
        )
    for name, value in values.items():
        setattr(
            module, name, nn.Parameter(value, requires_grad=False) if _needs_parameter(module, name, value) else value
        )
    return module.train(False)


def _needs_parameter(module: nn.Module, name: str, value: Any) -> bool:
    # weight and bias are parameters of the nn module; a graph may hold them as plain tensors
    return name in module._parameters and not isinstance(value, nn.Parameter)


def _refuse_unlifted_parameters(graph: fx.Graph, root: nn.Module) -> None:
    leftovers = sorted(
        {
            f"{user.target} uses {node.target}"
            for node in graph.nodes
            if node.op == "get_attr" and isinstance(fetch(root, node.target), nn.Parameter)
            for user in node.users
        }
    )
    if any(str(_aten.batch_norm.default) in leftover for leftover in leftovers):
        raise EngineError(
            "the exported program's batch norm runs in training mode; call model.eval() "
            "before torch.export.export and upload it again"
        )
    if leftovers:
        raise EngineError(
            "ln_structured on an exported program handles parameters of conv, linear, batch_norm "
            f"and layer_norm ops only; this graph also has {', '.join(leftovers[:3])}. Upload a "
            "state_dict with a registered architecture instead"
        )


def _translate_call(graph: fx.Graph, node: fx.Node, arg: Callable[[Any], Any]) -> Any:
    target = node.target
    assert callable(target)  # a call_function node's target is the function
    kwargs = dict(node.kwargs)
    if target is _aten.sym_size.int:
        # a method call keeps the size symbolic when the module is traced again
        return graph.call_method("size", (arg(node.args[0]), node.args[1]))
    if target in (_aten.max_pool2d.default, _aten.avg_pool2d.default) and not kwargs:
        pool = F.max_pool2d if target is _aten.max_pool2d.default else F.avg_pool2d
        args = list(node.args)
        if len(args) > 2 and not args[2]:
            args[2] = None  # aten's empty stride means "same as the kernel"
        return graph.call_function(pool, tuple(arg(args)))
    if target in (_aten.add.Tensor, _aten.mul.Tensor) and kwargs:
        return graph.call_function(target, arg(node.args), arg(kwargs))
    if target in _SIMPLE_CALLS:
        return graph.call_function(_SIMPLE_CALLS[target], arg(node.args), arg(kwargs))
    if _takes_computed_sizes(node):
        # torch.jit.trace records a size read off a tensor only where a torch function or tensor
        # method receives it; an aten overload called directly gets a plain int, and the trace
        # would keep the example's size (an expand to the class token's batch of 1)
        method = _tensor_method(target)
        if method is not None:
            return graph.call_method(method, arg(node.args), arg(kwargs))
        function = _torch_function(target)
        if function is not None:
            return graph.call_function(function, arg(node.args), arg(kwargs))
    return graph.call_function(target, arg(node.args), arg(kwargs))


def _tensor_method(target: Any) -> str | None:
    """The Tensor method an aten overload is (aten.expand.default -> "expand"), if there is one."""
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return None
    name = target.overloadpacket.__name__
    schema = target._schema
    takes_self = bool(schema.arguments) and schema.arguments[0].name == "self"
    return name if takes_self and hasattr(Tensor, name) else None


def _torch_function(target: Any) -> Callable[..., Any] | None:
    """The torch function an aten factory overload is (aten.arange.default -> torch.arange), if there is one."""
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return None
    function = getattr(torch, target.overloadpacket.__name__, None)
    return function if callable(function) else None


def _takes_computed_sizes(node: fx.Node) -> bool:
    """Whether an argument of `node` (or an element of a list argument) is a size computed in the graph."""
    values: list[Any] = []
    for value in [*node.args, *node.kwargs.values()]:
        values.extend(value if isinstance(value, (list, tuple)) else [value])
    return any(isinstance(v, fx.Node) and not isinstance(v.meta.get("val"), Tensor) for v in values)


def _unflatten_output(source: fx.GraphModule, leaves: list[Any]) -> Any:
    spec = getattr(source, "_out_spec", None)
    if spec is None or spec.type in (tuple, list):
        return tuple(leaves)
    if spec.is_leaf():
        return leaves[0]
    keys = spec.context
    if (
        isinstance(keys, (list, tuple))
        and len(keys) == len(leaves)
        and all(isinstance(key, str) for key in keys)
        and all(child.is_leaf() for child in spec.children_specs)
    ):
        # a dict of tensors (a Hugging Face ModelOutput): a plain dict, which FX, torch.jit.trace and
        # the engine's output selection all take
        return dict(zip(keys, leaves))
    raise EngineError(f"exported models returning a {spec.type.__name__} are not supported; return tensors")


def _replace_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    if not path:
        raise EngineError("cannot skip the whole model")
    set_path(root, path, module)


def _flattens_to_batch(node: fx.Node) -> bool:
    """True when a view/reshape turns (batch, ...) into (batch, everything else)."""
    source = node.args[0]
    before = source.meta.get("val") if isinstance(source, fx.Node) else None
    after = node.meta.get("val")
    if not isinstance(before, Tensor) or not isinstance(after, Tensor) or after.dim() != 2 or before.dim() <= 2:
        return False
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    try:
        return bool(statically_known_true(before.shape[0] == after.shape[0]))
    except Exception:
        return False


def _is_matrix(node: Any) -> bool:
    """Whether `node` is known to be a 2-D tensor (addmm's bias may broadcast; its operands may not)."""
    return _rank(node) == 2


def _rank(node: Any) -> int | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.dim() if isinstance(value, Tensor) else None
