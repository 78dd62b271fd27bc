"""Lifting an exported program's graph back to torch-level modules, for tools that need nn modules.

Two lifters live here, moved unchanged from the quantization and pruning stages:
- `torch_level_module` (quantization, codebook, smoothquant, sensitivity, qat) rebuilds
  the graph as a new fx.GraphModule: aten linear / conv / batch_norm calls on parameters
  become nn.Linear / nn.ConvNd / nn.BatchNormNd submodules and common aten ops their torch
  functions, so eager-mode tooling (quantize_dynamic, FX quantization, torchao) sees layers.
- `lift_exported_graph` (pruning's ln_structured) edits the graph in place: a plain
  container holding exactly one op's parameters is swapped for the nn module (layer_norm
  included) and reshapes that flatten all but the batch dimension become flatten(1), so
  torch-pruning can trace channel dependencies.

They are not merged yet: they differ in what they lift (layer_norm, shared parameters,
aten->torch translation) and in how (new graph vs in place), and merging them would change
behaviour; issue 14 asks for one lifter, which is the next step here.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from worker.compression.base import EngineError

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
    # copied again without the dead code, so no float copy of a lifted weight stays under its old name
    rebuilt = fx.GraphModule(rebuilt, rebuilt.graph, class_name="TorchLevelModule")
    return rebuilt.eval()


_CONV_TYPES: dict[Any, type[nn.Module]] = {}
_SIMPLE_CALLS: dict[Any, Callable[..., Any]] = {}


def _aten_tables() -> None:
    aten = torch.ops.aten
    _CONV_TYPES.update(
        {
            aten.conv1d.default: nn.Conv1d,
            aten.conv2d.default: nn.Conv2d,
            aten.conv3d.default: nn.Conv3d,
            aten.conv1d.padding: nn.Conv1d,
            aten.conv2d.padding: nn.Conv2d,
            aten.conv3d.padding: nn.Conv3d,
        }
    )
    _SIMPLE_CALLS.update(
        {
            aten.relu.default: F.relu,
            aten.relu_.default: F.relu,
            aten.sigmoid.default: torch.sigmoid,
            aten.tanh.default: torch.tanh,
            aten.flatten.using_ints: torch.flatten,
            aten.view.default: torch.reshape,
            aten.reshape.default: torch.reshape,
            aten.cat.default: torch.cat,
            aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
            aten.mean.dim: torch.mean,
            aten.permute.default: torch.permute,
            aten.transpose.int: torch.transpose,
            aten.add.Tensor: operator.add,
            aten.mul.Tensor: operator.mul,
        }
    )


def _translate_call(
    source: fx.GraphModule,
    root: nn.Module,
    graph: fx.Graph,
    node: fx.Node,
    arg: Callable[[Any], Any],
    lifted: dict[tuple[str, ...], str],
) -> Any:
    if not _SIMPLE_CALLS:
        _aten_tables()
    aten = torch.ops.aten
    target = node.target
    assert callable(target)  # a call_function node's target is the function
    kwargs = dict(node.kwargs)
    if target in (aten.linear.default, *_CONV_TYPES) and _reads_attributes(node, (1,)) and not kwargs:
        name = _lift(source, root, node, lifted, (1, 2), _make_layer)
        return graph.call_module(name, (arg(node.args[0]),))
    if target is aten.batch_norm.default and _reads_attributes(node, (1, 2, 3, 4)) and not node.args[5] and not kwargs:
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
    return all(
        isinstance(node.args[i], fx.Node) and node.args[i].op == "get_attr"  # type: ignore[union-attr]
        for i in indices
        if i < len(node.args)
    )


def _lift(
    source: fx.GraphModule,
    root: nn.Module,
    node: fx.Node,
    lifted: dict[tuple[str, ...], str],
    indices: tuple[int, ...],
    make: Callable[[fx.Node, list[Any]], nn.Module],
) -> str:
    """Put a module that owns the node's parameters (args at `indices`) on `root`; return its name."""
    attributes = [node.args[i] if i < len(node.args) else None for i in indices]
    for attribute in attributes:
        if attribute is not None and not (isinstance(attribute, fx.Node) and attribute.op == "get_attr"):
            raise EngineError(f"a {node.target} call computes its parameters; only stored parameters are supported")
    key = tuple(str(a.target) if isinstance(a, fx.Node) else "" for a in attributes)
    if key in lifted:
        return lifted[key]
    owner, _, weight_name = key[0].rpartition(".")
    # "attn.in_proj_weight" -> layer "attn.in_proj": on "attn", a module swap would drop attn.out_proj
    stem = weight_name.removesuffix("weight").rstrip("_")
    owner = ".".join(part for part in (owner, stem) if part)
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
        layer = _CONV_TYPES[node.target](
            weight.shape[1] * groups,
            weight.shape[0],
            tuple(weight.shape[2:]),
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias is not None,
            device="meta",
        )
    layer.weight = _as_parameter(weight)
    if bias is not None:
        layer.bias = _as_parameter(bias)
    return layer


def _make_batch_norm(node: fx.Node, tensors: list[Any]) -> nn.Module:
    weight, bias, running_mean, running_var = tensors
    args: tuple[Any, ...] = node.args
    value = node.meta.get("val")
    rank = value.dim() if isinstance(value, torch.Tensor) else 4
    norm_type = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(rank, nn.BatchNorm2d)
    norm = norm_type(
        running_mean.shape[0], eps=float(args[7]), momentum=float(args[6]), affine=weight is not None, device="meta"
    )
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


# ------------------------------------------------------------------- exported graph -> nn modules in place (pruning)


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


def lift_exported_graph(graph_module: fx.GraphModule) -> fx.GraphModule:
    """An equivalent graph module whose conv / linear / norm ops are calls of real nn modules.

    An exported program's module keeps parameters on plain container modules and calls
    aten ops on them, which torch-pruning cannot trace. This swaps each container for the
    nn module the op stands for (sharing the same parameter tensors) and turns the op
    into a call of it. Reshapes that flatten all but the batch dimension become
    `flatten(1)`, so they keep working when channels go away.

    Raises EngineError when a parameter is used by an op it cannot lift, since pruning
    around it would leave shapes that no longer fit.

    Example:
        >>> lifted = lift_exported_graph(torch.export.export(model, (x,)).module())
    """
    graph = graph_module.graph
    uses: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            uses[node.target] = uses.get(node.target, 0) + len(node.users)
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _RESHAPE_OPS and _flattens_to_batch(node):
            node.target, node.args, node.kwargs = _aten.flatten.using_ints, (node.args[0], 1), {}
            continue
        lifted = _module_for(graph_module, node, uses)
        if lifted is None:
            continue
        owner, module = lifted
        _set_submodule(graph_module, owner, module)
        with graph.inserting_before(node):
            call = graph.call_module(owner, (node.args[0],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    leftovers = sorted(
        {
            f"{user.target} uses {node.target}"
            for node in graph.nodes
            if node.op == "get_attr" and isinstance(_attr(graph_module, node.target), nn.Parameter)
            for user in node.users
        }
    )
    if leftovers:
        raise EngineError(
            "ln_structured on an exported program handles parameters of conv, linear, batch_norm "
            f"and layer_norm ops only; this graph also has {', '.join(leftovers[:3])}. Upload a "
            "state_dict with a registered architecture instead"
        )
    # A fresh GraphModule: the exported one refuses train()/eval(), which torch-pruning calls.
    return fx.GraphModule(graph_module, graph)


def _module_for(root: fx.GraphModule, node: fx.Node, uses: dict[str, int]) -> tuple[str, nn.Module] | None:
    """(owner path, nn module) equivalent to `node`, or None when it is not a liftable op."""
    target = node.target
    args: list[Any] = list(node.args) + [None] * 9
    kwargs: dict[str, Any] = dict(node.kwargs)
    if target is _aten.linear.default:
        tensors = {"weight": args[1], "bias": args[2] if args[2] is not None else kwargs.get("bias")}
    elif target in _CONV_OPS:
        tensors = {"weight": args[1], "bias": args[2] if args[2] is not None else kwargs.get("bias")}
    elif target is _aten.batch_norm.default:
        tensors = {"weight": args[1], "bias": args[2], "running_mean": args[3], "running_var": args[4]}
    elif target is _aten.layer_norm.default:
        tensors = {"weight": args[2], "bias": args[3]}
    else:
        return None
    owner = _common_owner(root, tensors, uses)
    if owner is None:
        return None
    values = {name: _attr(root, arg.target) for name, arg in tensors.items() if arg is not None}
    weight = values["weight"]
    module: nn.Module
    if target is _aten.linear.default:
        module = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in values, device="meta")
    elif target in _CONV_OPS:
        names = ("stride", "padding", "dilation", "groups")
        conv_args = {k: kwargs.get(k, v) for k, v in zip(names, args[3:7]) if kwargs.get(k, v) is not None}
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
        if args[5]:
            raise EngineError(
                "the exported program's batch norm runs in training mode; call model.eval() "
                "before torch.export.export and upload it again"
            )
        rank = _rank(node.args[0])
        if rank not in _BATCH_NORM_BY_RANK or "running_mean" not in values:
            return None
        module = _BATCH_NORM_BY_RANK[rank](weight.shape[0], eps=float(args[7]), momentum=float(args[6]), device="meta")
        tracked = getattr(root.get_submodule(owner), "num_batches_tracked", None)
        if isinstance(tracked, Tensor):
            module.num_batches_tracked = tracked
    else:
        module = nn.LayerNorm(
            list(args[1]), eps=float(args[4] if args[4] is not None else 1e-5), bias="bias" in values, device="meta"
        )
    for name, value in values.items():
        setattr(module, name, value)
    module.train(False)
    return owner, module


def _common_owner(root: fx.GraphModule, tensors: dict[str, Any], uses: dict[str, int]) -> str | None:
    """The container that owns exactly these tensors, each used by this one op; else None."""
    owners = set()
    for name, arg in tensors.items():
        if arg is None:
            continue
        if (
            not isinstance(arg, fx.Node)
            or arg.op != "get_attr"
            or not isinstance(arg.target, str)
            or uses.get(arg.target, 0) != 1
        ):
            return None
        owner, _, attribute = arg.target.rpartition(".")
        if attribute != name or not owner:
            return None
        owners.add(owner)
    if len(owners) != 1 or tensors.get("weight") is None:
        return None
    owner = owners.pop()
    container = root.get_submodule(owner)
    # Only plain containers holding nothing but these tensors are swapped for a real module.
    held = set(container._parameters) | set(container._buffers)
    if (
        type(container) is not nn.Module
        or any(True for _ in container.children())
        or not held <= set(tensors) | {"num_batches_tracked"}
    ):
        return None
    return owner


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


def _rank(node: Any) -> int | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.dim() if isinstance(value, Tensor) else None


def _attr(root: nn.Module, path: str) -> Any:
    owner, _, name = path.rpartition(".")
    return getattr(root.get_submodule(owner) if owner else root, name)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)
