"""aten.lstm / aten.gru calls of an exported graph rebuilt as nn.LSTM / nn.GRU (graph_lift).

A TorchScript trace of the aten op sizes its zero initial state for the example's batch, and the op
does not check it, so the artifact crashed natively at any other batch; FX quantization cannot trace
the op and quantize_dynamic cannot reach its weights. As modules, all three work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from worker.compression.module_paths import fetch, has_submodule, set_path

_aten = torch.ops.aten
# aten's recurrent ops take the flat weight list that nn.LSTM / nn.GRU keep in `_flat_weights`
_RNN_OPS: dict[Any, Any] = {_aten.lstm.input: nn.LSTM, _aten.gru.input: nn.GRU}
_ZEROS_OPS = (_aten.zeros.default, _aten.zeros_like.default, _aten.new_zeros.default)


def has_recurrent_ops(graph: nn.Module) -> bool:
    """Whether an exported graph calls aten.lstm / aten.gru (whose zero state a trace would size for one batch)."""
    return isinstance(graph, fx.GraphModule) and any(
        node.op == "call_function" and node.target in _RNN_OPS for node in graph.graph.nodes
    )


def recurrent_layer(source: fx.GraphModule, node: fx.Node) -> tuple[str, nn.RNNBase] | None:
    """The nn.LSTM / nn.GRU an aten.lstm.input / aten.gru.input call on stored weights stands for, and its name.

    As an aten call FX quantization cannot trace it (its zero initial state is built from a
    symbolic batch size) and quantize_dynamic cannot reach its weights; as a module both can.
    """
    cls = _RNN_OPS.get(node.target)
    if cls is None:
        return None
    args: list[Any] = list(node.args)  # aten.lstm.input / aten.gru.input: fixed positional schema
    _input, _hx, params, has_biases, num_layers, dropout, _train, bidirectional, batch_first = args
    if not all(isinstance(p, fx.Node) and p.op == "get_attr" for p in params):
        return None
    per_layer = (4 if has_biases else 2) * (2 if bidirectional else 1)
    if len(params) != per_layer * num_layers:
        return None  # projections (proj_size) add a weight per layer: left as the aten call
    weights = [fetch(source, str(p.target)) for p in params]
    gates = 4 if cls is nn.LSTM else 3
    module = cls(
        weights[0].shape[1],
        weights[0].shape[0] // gates,
        num_layers=int(num_layers),
        bias=bool(has_biases),
        batch_first=bool(batch_first),
        dropout=float(dropout),
        bidirectional=bool(bidirectional),
        device="meta",
    )
    for name, value in zip(module._flat_weights_names, weights):
        setattr(module, name, value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False))
    owners = {str(p.target).rpartition(".")[0] for p in params}
    leaves = [str(p.target).rpartition(".")[2] for p in params]
    owner = owners.pop() if len(owners) == 1 else ""
    name = owner if owner and leaves == list(module._flat_weights_names) else f"recurrent_{node.name}"
    return name, module.train(False)


def call_recurrent(
    graph: fx.Graph, root: nn.Module, node: fx.Node, recurrent: tuple[str, nn.RNNBase], arg: Callable[[Any], Any]
) -> fx.Node:
    """Call the lifted recurrent module; its result is made the aten op's flat (output, h_n[, c_n]) tuple."""
    name, module = recurrent
    if has_submodule(root, name):
        # the container made for the weights' get_attr nodes, which the module replaces
        container = root.get_submodule(name)
        if any(True for _ in container.children()) or set(container._buffers) - set(module._flat_weights_names):
            name = f"recurrent_{node.name}"
    set_path(root, name, module)
    source, hx = node.args[0], node.args[1]
    assert isinstance(hx, (list, tuple, fx.Node))  # the op's initial state: a list (LSTM) or a tensor (GRU)
    states = list(hx) if isinstance(hx, (list, tuple)) else [hx]
    if all(isinstance(s, fx.Node) and s.target in _ZEROS_OPS for s in states):
        # a zero initial state is the module's default; the aten op needs it spelled out
        called = graph.call_module(name, (arg(source),))
    else:
        state = tuple(arg(states)) if isinstance(module, nn.LSTM) else arg(hx)
        called = graph.call_module(name, (arg(source), state))
    if isinstance(module, nn.LSTM):
        return graph.call_function(_lstm_outputs, (called,))
    return called


def _lstm_outputs(result: Any) -> tuple[Any, Any, Any]:
    """nn.LSTM's (output, (h_n, c_n)) as aten.lstm's (output, h_n, c_n)."""
    return result[0], result[1][0], result[1][1]
