"""The figures a pruning stage reports: MACs before and after, and the per-layer table."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from worker.compression.base import EngineError, ModelKind
from worker.compression.inputs import Batch, ModelInputs, call_model
from worker.compression.pruning.layers import _device_of, _matrix_layers, _weight

# ---------------------------------------------------------------- figures


def count_macs(model: nn.Module, kind: ModelKind, example_input: Batch) -> dict[str, Any]:
    """Multiply-accumulates of one forward pass on one sample (or the whole example if it must).

    Eager modules are counted by torch-pruning (Conv, Linear, norms; bias adds included);
    TorchScript and graph modules, which it cannot hook, by torch.utils.flop_counter
    (matmul and convolution only, FLOPs / 2). Dense counts: zeros of unstructured
    pruning are still multiplied by dense kernels. {"macs": None, ...} when neither runs.
    """
    candidates = (
        [example_input[:1], example_input] if example_input.dim() and len(example_input) > 1 else [example_input]
    )
    counters: list[tuple[str, Callable[[Batch], int]]] = []
    if kind == "eager":
        counters.append(("torch_pruning.utils.count_ops_and_params", lambda x: _tp_macs(model, x)))
    counters.append(("torch.utils.flop_counter (flops / 2)", lambda x: _flop_counter_macs(model, x)))
    for name, counter in counters:
        for example in candidates:
            try:
                return {
                    "macs": counter(example.to(_device_of(model))),
                    "counter": name,
                    "input_shape": list(example.shape),
                }
            except Exception:
                continue
    return {"macs": None, "counter": None, "input_shape": None}


def _tp_macs(model: nn.Module, example: Batch) -> int:
    import torch_pruning as tp

    if isinstance(example, ModelInputs):
        raise EngineError("torch-pruning's counter takes one input tensor")  # the flop counter takes over
    was_training = model.training
    try:
        macs, _ = tp.utils.count_ops_and_params(model, example)
    finally:
        model.train(was_training)
    return int(macs)


def _flop_counter_macs(model: nn.Module, example: Batch) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        call_model(model, example)
    return int(counter.get_total_flops()) // 2


def _layer_table(model: nn.Module, shapes_before: dict[str, list[int]], targeted: set[str]) -> list[dict[str, Any]]:
    rows = []
    for name, module in _matrix_layers(model):
        weight = _weight(module)
        rows.append(
            {
                "layer": name,
                "shape_before": shapes_before.get(name),
                "shape_after": list(weight.shape),
                "sparsity": round(float((weight == 0).sum()) / max(1, weight.numel()), 6),
                "targeted": name in targeted,
            }
        )
    return rows
