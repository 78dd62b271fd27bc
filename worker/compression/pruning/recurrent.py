"""ln_structured on recurrent layers: hidden units of an LSTM / GRU removed on the exported graph.

A hidden unit k of a one-layer, one-direction LSTM / GRU is its row in every gate of
weight_ih / weight_hh / the biases, its column of weight_hh (it feeds every unit at the next
step) and the column of each Linear that reads the hidden state. torch-pruning 1.6 narrows the
embedding in front of an nn.LSTM but not the LSTM's input (the model then fails to run), so this
module follows the graph itself: from the recurrent op's outputs through ops that keep the last
(hidden) dimension to the `aten.linear` calls that read it, refusing any other consumer.

Removing a unit is exact against the unpruned model with that unit's outgoing weights (its
weight_hh column and the consumers' columns) zeroed, which `check_same_outputs` verifies.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from worker.compression.base import EngineError, StageContext
from worker.compression.graph_lift_recurrent import has_recurrent_ops as has_recurrent_ops
from worker.compression.pruning.transformer import check_same_outputs

_aten = torch.ops.aten
GATES = {_aten.lstm.input: 4, _aten.gru.input: 3}
_ZEROS = (_aten.zeros.default, _aten.new_zeros.default)
# ops whose output keeps the hidden units as its last dimension, untouched
_PASS_THROUGH = {
    _aten.select.int,
    _aten.slice.Tensor,
    _aten.squeeze.dim,
    _aten.unsqueeze.default,
    _aten.dropout.default,
    _aten.relu.default,
    _aten.tanh.default,
    _aten.clone.default,
    _aten.contiguous.default,
    operator.getitem,
}


@dataclass
class RecurrentGroup:
    node: fx.Node
    gates: int
    hidden: int
    params: list[str]  # weight_ih, weight_hh[, bias_ih, bias_hh] targets
    zeros: list[fx.Node]  # the zero initial states, sized by the hidden width
    consumers: list[str]  # weights of the aten.linear calls reading the hidden units


def find_recurrent(graph: fx.GraphModule) -> list[RecurrentGroup]:
    """Every LSTM / GRU op of `graph` whose hidden units can go; EngineError naming the first that cannot."""
    groups = []
    for node in graph.graph.nodes:
        if node.op != "call_function" or node.target not in GATES:
            continue
        args: list[Any] = list(node.args)  # aten.lstm.input / aten.gru.input: fixed positional schema
        _input, hx, params, has_biases, num_layers, _dropout, _train, bidirectional, _batch_first = args
        name = f"{node.target} ({node.name})"
        if num_layers != 1 or bidirectional or len(params) != (4 if has_biases else 2):
            raise EngineError(
                f"ln_structured narrows one-layer, one-direction LSTM / GRU ops only; {name} has "
                f"{num_layers} layer(s){', both directions' if bidirectional else ''}; prune it with "
                "l1_unstructured or quantize it with dynamic_int8 instead"
            )
        if not all(isinstance(p, fx.Node) and p.op == "get_attr" for p in params):
            raise EngineError(f"ln_structured: the weights of {name} are computed, not stored")
        states = list(hx) if isinstance(hx, (list, tuple)) else [hx]
        if not all(isinstance(s, fx.Node) and s.target in _ZEROS for s in states):
            raise EngineError(
                f"ln_structured: {name} starts from a state given as an input, whose width would change; "
                "only recurrent layers starting from zeros can be narrowed"
            )
        gates = GATES[node.target]
        weight_ih = _get(graph, str(params[0].target))
        groups.append(
            RecurrentGroup(
                node=node,
                gates=gates,
                hidden=int(weight_ih.shape[0]) // gates,
                params=[str(p.target) for p in params],
                zeros=states,
                consumers=_consumers(node),
            )
        )
    return groups


def _consumers(node: fx.Node) -> list[str]:
    """Weights of the aten.linear calls reached from the op's outputs through pass-through ops."""
    consumers: list[str] = []
    pending = list(node.users)
    seen: set[fx.Node] = set()
    while pending:
        user = pending.pop()
        if user in seen:
            continue
        seen.add(user)
        if user.op == "call_function" and user.target is _aten.linear.default:
            weight = user.args[1]
            if user.args[0] in seen or user.args[0] is node:
                if isinstance(weight, fx.Node) and weight.op == "get_attr":
                    consumers.append(str(weight.target))
                    continue
        elif user.op == "call_function" and user.target in _PASS_THROUGH and _keeps_last_dim(user):
            pending.extend(user.users)
            continue
        what = "the model's output" if user.op == "output" else str(user.target)
        raise EngineError(
            f"ln_structured: the hidden state of {node.target} ({node.name}) reaches {what}, which "
            "removing hidden units would change; only Linear layers may read it (prune with "
            "l1_unstructured instead)"
        )
    if not consumers:
        raise EngineError(f"ln_structured: no Linear layer reads the hidden state of {node.target} ({node.name})")
    return consumers


def _keeps_last_dim(node: fx.Node) -> bool:
    if node.target is operator.getitem or node.target in (_aten.dropout.default, _aten.relu.default):
        return True
    if node.target in (_aten.tanh.default, _aten.clone.default, _aten.contiguous.default):
        return True
    value = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    dim = node.args[1] if len(node.args) > 1 else 0
    if not isinstance(value, Tensor) or not isinstance(dim, int):
        return False
    rank = value.dim() + (1 if node.target is _aten.unsqueeze.default else 0)
    return dim % rank != rank - 1


def prune_recurrent(graph: fx.GraphModule, options: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """Remove the `amount` fraction of hidden units of weakest Ln norm from every LSTM / GRU of `graph`.

    Returns the stage figures; `graph` is changed in place.
    """
    amount, norm = float(options["amount"]), float(options["norm"])
    groups = find_recurrent(graph)
    if not groups:
        raise EngineError("ln_structured found no LSTM / GRU op in this graph")
    reference = copy.deepcopy(graph)
    rows, targeted = [], []
    for group in groups:
        keep = _kept_units(graph, group, amount, norm)
        removed = [k for k in range(group.hidden) if k not in set(keep.tolist())]
        _zero_outgoing(reference, group, removed)
        _narrow(graph, group, keep)
        owner = group.params[0].rpartition(".")[0]
        rows.append({"layer": owner, "hidden_before": group.hidden, "hidden_after": len(keep)})
        targeted.append(owner)
    graph.recompile()
    check_same_outputs(graph, reference, ctx.example_input)
    return {
        "scheme": "ln_structured",
        "amount": amount,
        "norm": norm,
        "amount_means": "fraction of each LSTM / GRU's hidden units removed",
        "importance": "Ln norm of a unit's gate rows, its recurrent column and the Linear columns reading it",
        "pruned_as": "exported program (torch.export)",
        "recurrent": rows,
        "targeted": targeted,
    }


def _kept_units(graph: fx.GraphModule, group: RecurrentGroup, amount: float, norm: float) -> Tensor:
    hidden = group.hidden
    rows = [_get(graph, target).detach().reshape(group.gates, hidden, -1) for target in group.params]
    score = sum(row.abs().pow(norm).sum(dim=(0, 2)) for row in rows)
    score = score + _get(graph, group.params[1]).detach().abs().pow(norm).sum(dim=0)
    for target in group.consumers:
        score = score + _get(graph, target).detach().abs().pow(norm).sum(dim=0)
    count = max(1, hidden - int(round(amount * hidden)))
    return torch.sort(torch.topk(score, count).indices).values


def _zero_outgoing(reference: fx.GraphModule, group: RecurrentGroup, removed: list[int]) -> None:
    index = torch.tensor(removed, dtype=torch.long)
    for target in [group.params[1], *group.consumers]:
        _set(reference, target, _get(reference, target).detach().clone().index_fill_(1, index, 0.0))


def _narrow(graph: fx.GraphModule, group: RecurrentGroup, keep: Tensor) -> None:
    rows = torch.cat([gate * group.hidden + keep for gate in range(group.gates)])
    for position, target in enumerate(group.params):
        value = _get(graph, target).detach()[rows]
        if position == 1:  # weight_hh also reads the hidden units
            value = value[:, keep]
        _set(graph, target, value.contiguous())
    for target in group.consumers:
        _set(graph, target, _get(graph, target).detach()[:, keep].contiguous())
    for zeros in group.zeros:
        position = 0 if zeros.target is _aten.zeros.default else 1
        size: list[Any] = list(zeros.args[position])  # type: ignore[arg-type]  # a zeros op's size is a list
        size[-1] = len(keep)
        zeros.args = (*zeros.args[:position], size, *zeros.args[position + 1 :])


def _get(graph: nn.Module, target: str) -> Tensor:
    owner, _, leaf = target.rpartition(".")
    value = getattr(graph.get_submodule(owner) if owner else graph, leaf)
    assert isinstance(value, Tensor)
    return value


def _set(graph: nn.Module, target: str, value: Tensor) -> None:
    owner, _, leaf = target.rpartition(".")
    module = graph.get_submodule(owner) if owner else graph
    old = getattr(module, leaf)
    if isinstance(old, nn.Parameter):
        setattr(module, leaf, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        module.register_buffer(leaf, value)
