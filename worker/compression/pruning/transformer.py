"""Structured pruning of transformers on the exported graph: whole attention heads and MLP channels.

torch-pruning's dependency graph (the CNN path, structured.py) cannot follow what a
transformer's exported program is made of: fused q/k/v projections split by views,
`aten.embedding`, `scaled_dot_product_attention`, Hugging Face's `Conv1D` as `addmm`, and
head counts written into view shapes. So transformers are pruned on the exported graph
itself, which every upload format reaches (eager modules are exported with the job's
declared dynamic dimensions first):

- an attention group is one `scaled_dot_product_attention` whose query, key and value
  come through shape-only ops (view, transpose, split, select, ...) from linear / addmm
  projections and whose output reaches one projection the same way. Which projection
  channel feeds which head is not guessed from the layout: the graph is run once with
  every projection output replaced by its channel index, and the indices read where
  they arrive (fused q/k/v, timm- or nn.MultiheadAttention-style layouts alike).
- an MLP group is a linear / addmm whose output reaches exactly one other projection
  through element-wise ops only (GELU, GPT-2's tanh GELU, ReLU, ...): its channels are
  the intermediate width.

The hidden (residual) width, the embeddings and the classifier stay as they are:
changing the residual width would touch every layer norm, embedding and tied LM head at
once, which is a different, riskier transformation. After slicing the weights, the head
count and widths written into view / split shapes on the group's path are rewritten, and
the pruned graph is checked against the original with the removed heads / channels
zeroed: outputs must agree, or the stage fails instead of returning a wrong model.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from worker.compression.base import EngineError
from worker.compression.inputs import Batch, as_call, batch_of, call_model, output_leaves

aten = torch.ops.aten

# ops that only move data: a channel keeps its identity through them
SHAPE_OPS: set[Any] = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.transpose.int,
    aten.permute.default,
    aten.contiguous.default,
    aten.clone.default,
    aten.unflatten.int,
    aten.flatten.using_ints,
    aten.select.int,
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.chunk.default,
    aten.unbind.int,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.dropout.default,
    aten.alias.default,
    operator.getitem,
}
# element-wise ops between an MLP's two projections (with scalars or each other)
ELEMENTWISE: set[Any] = {
    aten.gelu.default,
    aten.relu.default,
    aten.silu.default,
    aten.tanh.default,
    aten.sigmoid.default,
    aten.hardswish.default,
    aten.erf.default,
    aten.neg.default,
    aten.mul.Tensor,
    aten.add.Tensor,
    aten.sub.Tensor,
    aten.div.Tensor,
    aten.pow.Tensor_Scalar,
}
SDPA = aten.scaled_dot_product_attention.default


@dataclass
class Projection:
    """A linear (weight [out, in]) or addmm (Hugging Face Conv1D, weight [in, out]) on parameters."""

    node: fx.Node
    weight: str
    bias: str | None
    out_axis: int  # axis of the weight that holds output channels

    @property
    def in_axis(self) -> int:
        return 1 - self.out_axis

    @property
    def input(self) -> fx.Node:
        return self.node.args[0] if self.node.target is aten.linear.default else self.node.args[1]  # type: ignore[return-value]


@dataclass
class AttentionGroup:
    sdpa: fx.Node
    sources: list[Projection]  # the projections of query, key and value (the same one when fused)
    consumer: Projection
    heads: int
    head_dim: int
    path: list[fx.Node] = field(default_factory=list)
    # per head: {producer weight name: its output channels}, and the consumer's input channels
    producer_channels: list[dict[str, list[int]]] = field(default_factory=list)
    consumer_channels: list[list[int]] = field(default_factory=list)


@dataclass
class MlpGroup:
    producer: Projection
    consumer: Projection
    width: int
    path: list[fx.Node] = field(default_factory=list)


def projection_of(graph: fx.GraphModule, node: Any) -> Projection | None:
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target is aten.linear.default:
        weight, bias, axis = node.args[1], node.args[2] if len(node.args) > 2 else None, 0
    elif node.target is aten.addmm.default and not node.kwargs:
        weight, bias, axis = node.args[2], node.args[0], 1
    else:
        return None
    if not isinstance(weight, fx.Node) or not _is_parameter(graph, weight):
        return None
    if bias is not None and not (isinstance(bias, fx.Node) and _is_parameter(graph, bias)):
        return None
    if len(weight.users) != 1:  # a shared (tied) weight would change elsewhere too
        return None
    return Projection(node, str(weight.target), str(bias.target) if isinstance(bias, fx.Node) else None, axis)


def _is_parameter(graph: fx.GraphModule, node: Any) -> bool:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return False
    value = _get(graph, str(node.target))
    return isinstance(value, Tensor) and value.is_floating_point()


def _get(graph: nn.Module, target: str) -> Any:
    owner, _, leaf = target.rpartition(".")
    return getattr(graph.get_submodule(owner) if owner else graph, leaf)


def _set_parameter(graph: nn.Module, target: str, value: Tensor) -> None:
    owner_path, _, leaf = target.rpartition(".")
    owner = graph.get_submodule(owner_path) if owner_path else graph
    old = getattr(owner, leaf)
    if leaf in owner._parameters or isinstance(old, nn.Parameter):
        owner._parameters[leaf] = nn.Parameter(value.contiguous(), requires_grad=old.requires_grad)
    else:
        setattr(owner, leaf, value.contiguous())


# ---------------------------------------------------------------- finding groups


def _walk_back(node: Any, path: list[fx.Node]) -> fx.Node | None:
    """The first node before `node` that is not a shape op (collecting the shape ops passed)."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in SHAPE_OPS:
        path.append(node)
        node = node.args[0]
    return node if isinstance(node, fx.Node) else None


def _walk_forward(start: fx.Node, graph: fx.GraphModule, path: list[fx.Node]) -> Projection | None:
    """The one projection that `start`'s value reaches through shape ops only, or None."""
    found: list[Projection] = []
    frontier = [start]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            projection = projection_of(graph, user)
            if projection is not None and projection.input is node:
                found.append(projection)
            elif user.op == "call_function" and user.target in SHAPE_OPS:
                path.append(user)
                frontier.append(user)
            else:
                return None
    if len(found) != 1:
        return None
    return found[0]


def find_attention(graph: fx.GraphModule) -> list[AttentionGroup]:
    groups = []
    for node in graph.graph.nodes:
        if node.op != "call_function" or node.target is not SDPA:
            continue
        path: list[fx.Node] = []
        sources = [projection_of(graph, _walk_back(arg, path)) for arg in node.args[:3]]
        consumer = _walk_forward(node, graph, path)
        query = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
        if consumer is None or any(s is None for s in sources) or query is None or query.dim() < 3:
            continue
        groups.append(
            AttentionGroup(
                node,
                [s for s in sources if s is not None],
                consumer,
                int(query.shape[-3]),
                int(query.shape[-1]),
                path,
            )
        )
    return groups


def find_mlps(graph: fx.GraphModule, taken: set[str]) -> list[MlpGroup]:
    groups = []
    for node in graph.graph.nodes:
        producer = projection_of(graph, node)
        if producer is None or producer.weight in taken:
            continue
        closure, path, consumers = _elementwise_closure(graph, node)
        if closure is None or len({c.node for c in consumers}) != 1 or consumers[0].weight in taken:
            continue
        # another tensor joining the channels (a residual add, a gate) makes them shared
        if any(a not in closure and not _is_scalar(a) for n in path for a in n.all_input_nodes if a.op != "get_attr"):
            continue
        width = int(_get(graph, producer.weight).shape[producer.out_axis])
        groups.append(MlpGroup(producer, consumers[0], width, path))
    return groups


def _elementwise_closure(
    graph: fx.GraphModule, start: fx.Node
) -> tuple[set[fx.Node] | None, list[fx.Node], list[Projection]]:
    """Everything `start` reaches through element-wise and shape ops, and the projections it ends in
    (None when it also reaches anything else: an output, a reduction, attention)."""
    closure, path, consumers = {start}, [], []
    frontier = [start]
    while frontier:
        current = frontier.pop()
        for user in current.users:
            projection = projection_of(graph, user)
            if projection is not None and projection.input is current:
                consumers.append(projection)
            elif user.op == "call_function" and (user.target in ELEMENTWISE or user.target in SHAPE_OPS):
                if user not in closure:
                    closure.add(user)
                    path.append(user)
                    frontier.append(user)
            else:
                return None, path, consumers
    return closure, path, consumers


def _is_scalar(node: fx.Node) -> bool:
    value = node.meta.get("val")
    return not isinstance(value, Tensor) or value.dim() == 0


# ---------------------------------------------------------------- which channel is which head


class _ChannelProbe(fx.Interpreter):
    """Runs the graph with each group's projection outputs replaced by their channel index and
    attention outputs by head-major indices (head * head_dim + d), and records what arrives."""

    def __init__(self, graph: fx.GraphModule, groups: list[AttentionGroup]) -> None:
        super().__init__(graph)
        self.sources = {s.node for g in groups for s in g.sources}
        self.sdpas = {g.sdpa: g for g in groups}
        self.consumers = {g.consumer.node for g in groups}
        self.seen: dict[fx.Node, Any] = {}

    def run_node(self, node: fx.Node) -> Any:
        if node in self.consumers:
            self.seen[node] = self.env[Projection(node, "", None, 0).input].detach().clone()
        if node in self.sdpas:
            self.seen[node] = [self.env[arg].detach().clone() for arg in node.args[:3]]  # type: ignore[index]
        result = super().run_node(node)
        if node in self.sources:
            channels = result.shape[-1]
            # float32 holds channel indices exactly (up to 2**24) through the data moves on the path
            return torch.arange(channels, dtype=torch.float32).expand(result.shape).clone()
        if node in self.sdpas:
            heads, dim = result.shape[-3], result.shape[-1]
            index = torch.arange(heads, dtype=torch.float32)[:, None, None] * dim + torch.arange(dim)
            return index.expand(result.shape).clone()
        return result


def probe_channels(graph: fx.GraphModule, groups: list[AttentionGroup], example: Batch) -> list[AttentionGroup]:
    """Fill in each group's per-head channels; groups whose data path does not keep channels apart are dropped."""
    probe = _ChannelProbe(graph, groups)
    try:
        with torch.no_grad():
            probe.run(*call_args(example))
    except Exception as error:
        raise EngineError(f"could not trace which channels feed which attention head: {error}") from error
    kept = []
    for group in groups:
        arrived = probe.seen.get(group.sdpa)
        at_consumer = probe.seen.get(group.consumer.node)
        if arrived is None or at_consumer is None:
            continue
        per_head: list[dict[str, list[int]]] = [{} for _ in range(group.heads)]
        consistent = True
        for tensor, source in zip(arrived, group.sources):
            flat = tensor.reshape(-1, *tensor.shape[-3:])
            if not torch.equal(flat, flat[:1].expand_as(flat)) or tensor.shape[-3] != group.heads:
                consistent = False
                break
            for head in range(group.heads):
                column = flat[0, head, :, :]
                if not torch.equal(column, column[:1].expand_as(column)):
                    consistent = False
                    break
                per_head[head].setdefault(source.weight, []).extend(int(v) for v in column[0].tolist())
        rows = at_consumer.reshape(-1, at_consumer.shape[-1])
        if not consistent or not torch.equal(rows, rows[:1].expand_as(rows)):
            continue
        owners: list[list[int]] = [[] for _ in range(group.heads)]
        for channel, value in enumerate(rows[0].tolist()):
            owners[int(value) // group.head_dim].append(channel)
        group.producer_channels, group.consumer_channels = per_head, owners
        kept.append(group)
    return kept


def call_args(example: Batch) -> list[Tensor]:
    args, kwargs = as_call(example)
    if kwargs:
        raise EngineError("head pruning of a graph does not take constant forward arguments")
    return list(args)


# ---------------------------------------------------------------- pruning


def _norms(graph: fx.GraphModule, projection: Projection, output: bool) -> Tensor:
    weight = _get(graph, projection.weight).detach().float()
    axis = projection.out_axis if output else projection.in_axis
    squares: Tensor = weight.pow(2).sum(dim=1 - axis)
    if output and projection.bias is not None:
        squares = squares + _get(graph, projection.bias).detach().float().pow(2)
    return squares


def _keep(count: int, fraction: float) -> int:
    """How many of `count` heads / channels stay: `fraction` of them removed, rounded down, one kept at least."""
    return max(1, count - int(fraction * count))


def _slice(graph: fx.GraphModule, projection: Projection, channels: list[int], output: bool) -> None:
    index = torch.tensor(sorted(channels), dtype=torch.long)
    weight = _get(graph, projection.weight)
    axis = projection.out_axis if output else projection.in_axis
    _set_parameter(graph, projection.weight, weight.detach().index_select(axis, index))
    if output and projection.bias is not None:
        _set_parameter(graph, projection.bias, _get(graph, projection.bias).detach().index_select(0, index))


def prune_attention(graph: fx.GraphModule, group: AttentionGroup, fraction: float) -> tuple[list[int], list[int]]:
    """Remove the `fraction` weakest heads of `group` (L2 norm of all their weights); (kept, removed) heads."""
    keep = _keep(group.heads, fraction)
    scores = torch.zeros(group.heads)
    consumer_norms = _norms(graph, group.consumer, output=False)
    for head in range(group.heads):
        for source in {s.weight: s for s in group.sources}.values():
            scores[head] += _norms(graph, source, output=True)[group.producer_channels[head][source.weight]].sum()
        scores[head] += consumer_norms[group.consumer_channels[head]].sum()
    kept = sorted(torch.topk(scores, keep).indices.tolist())
    removed = [h for h in range(group.heads) if h not in kept]
    if not removed:
        return kept, removed
    for source in {s.weight: s for s in group.sources}.values():
        total = int(_get(graph, source.weight).shape[source.out_axis])
        dropped = {c for h in removed for c in group.producer_channels[h].get(source.weight, [])}
        _slice(graph, source, [c for c in range(total) if c not in dropped], output=True)
    _slice(graph, group.consumer, [c for h in kept for c in group.consumer_channels[h]], output=False)
    _rewrite_sizes(group.path, group.heads, keep, group.head_dim)
    return kept, removed


def prune_mlp(graph: fx.GraphModule, group: MlpGroup, fraction: float) -> list[int]:
    """Remove the `fraction` weakest intermediate channels of `group`; the removed channels."""
    keep = _keep(group.width, fraction)
    scores = _norms(graph, group.producer, output=True) + _norms(graph, group.consumer, output=False)
    kept = sorted(torch.topk(scores, keep).indices.tolist())
    removed = [c for c in range(group.width) if c not in kept]
    if removed:
        _slice(graph, group.producer, kept, output=True)
        _slice(graph, group.consumer, kept, output=False)
        _rewrite_sizes(group.path, 1, 1, group.width, new_width=keep)
    return removed


def _rewrite_sizes(path: list[fx.Node], heads: int, kept: int, head_dim: int, new_width: int | None = None) -> None:
    """Sizes written into the shapes on a group's path follow the new head count / width.

    Attention: a shape ending in head_dim is per-head, so a `heads` in it (or in the
    batch * heads product feeding it) becomes `kept`; elsewhere multiples of the heads'
    total width (heads * head_dim, 2x or 3x for fused projections) scale down. MLP: the
    width itself (`head_dim` here, with heads = 1) becomes `new_width`.
    """
    old_width = heads * head_dim
    width = new_width if new_width is not None else kept * head_dim

    def scaled(value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and value > 0 and value % old_width == 0:
            multiple = value // old_width
            if multiple in ((1,) if new_width is not None else (1, 2, 3)):
                return multiple * width
        return value

    def rewrite_list(values: list[Any] | tuple[Any, ...]) -> list[Any]:
        per_head = new_width is None and len(values) >= 2 and values[-1] == head_dim
        if per_head:
            result = list(values)
            for position, value in enumerate(result[:-1]):
                if value == heads and isinstance(value, int):
                    result[position] = kept
                elif isinstance(value, fx.Node) and value.target is operator.mul:
                    value.args = tuple(kept if a == heads and isinstance(a, int) else a for a in value.args)
            return result
        return [scaled(v) for v in values]

    for node in path:
        node.args = tuple(
            rewrite_list(arg) if isinstance(arg, (list, tuple)) else (scaled(arg) if index > 0 else arg)
            for index, arg in enumerate(node.args)
        )


# ---------------------------------------------------------------- the check


def masked_reference(graph: fx.GraphModule, zeroed: dict[str, tuple[Projection, list[int]]]) -> fx.GraphModule:
    """A copy of the unpruned graph with the consumer inputs of removed heads / channels zeroed:
    what the pruned graph must compute exactly."""
    reference = copy.deepcopy(graph)
    for projection, channels in zeroed.values():
        if not channels:
            continue
        weight = _get(reference, projection.weight).detach().clone()
        index = torch.tensor(channels, dtype=torch.long)
        weight.index_fill_(projection.in_axis, index, 0.0)
        _set_parameter(reference, projection.weight, weight)
    return reference


def check_same_outputs(pruned: nn.Module, reference: nn.Module, example: Batch) -> None:
    batches = [example, batch_of(example, len(example) + 1)]
    for batch in batches:
        with torch.no_grad():
            try:
                got = output_leaves(call_model(pruned, batch))
            except Exception as error:
                raise EngineError(
                    f"after removing heads / channels the graph no longer runs on inputs of shape "
                    f"{list(batch.shape)}: {str(error).strip().splitlines()[-1]}; the model writes sizes into its "
                    "code that could not be followed; exclude these layers with layers.exclude"
                ) from error
            expected = output_leaves(call_model(reference, batch))
        for (name, a), (_, b) in zip(got, expected):
            if not a.is_floating_point():
                continue
            scale = max(float(b.abs().max()), 1e-6)
            if a.shape != b.shape or float((a - b).abs().max()) > 1e-3 * scale:
                raise EngineError(
                    f"the pruned graph's output {name} differs from the original with the same heads / "
                    "channels removed, so the graph's data layout was not followed; nothing was pruned"
                )
