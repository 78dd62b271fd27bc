"""Per-layer pruning sensitivity: the whole model's fidelity with only one layer pruned, at a few amounts.

`analyze/sensitivity` with `pruning: true` adds this table beside the quantization one. For each
Linear and Conv layer and each amount in PRUNING_AMOUNTS, the smallest-magnitude fraction of that
layer's weights alone is zeroed (unstructured L1, as `prune/l1_unstructured` does) in the model
itself, the model is judged on the same probe set (SQNR against the float outputs, top-1 drop with
labels), and the weight is put back. Rows come back most harmful first, by the largest amount.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, cast

import torch
from torch import nn

from worker.compression.base import StageContext
from worker.compression.sensitivity import Probe, harm_key
from worker.compression.upstream_cache import UpstreamCache

PRUNING_AMOUNTS = (0.3, 0.5, 0.7)
_PRUNABLE = {"Linear", "Conv1d", "Conv2d", "Conv3d"}


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Linear and Conv layers by name (eager modules, or TorchScript modules by their original type)."""
    return {
        name: module
        for name, module in model.named_modules()
        if name and str(getattr(module, "original_name", None) or type(module).__name__) in _PRUNABLE
    }


def l1_pruned(weight: torch.Tensor, amount: float) -> torch.Tensor:
    """`weight` with its round(amount * numel) smallest-magnitude entries zeroed (torch's L1Unstructured rule)."""
    count = round(amount * weight.numel())
    pruned = weight.clone()
    if count:
        smallest = weight.abs().flatten().topk(count, largest=False).indices
        pruned.view(-1)[smallest] = 0
    return pruned


def pruning_sensitivity(
    model: nn.Module,
    ctx: StageContext,
    probe: Probe,
    amounts: tuple[float, ...] = PRUNING_AMOUNTS,
    progress: Callable[[float, str], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per prunable layer, {"layer", "kind", "parameters", "results": [{"amount", "sqnr_db",
    "accuracy_drop"}]}, most harmful first (by the largest amount, then the next).

    The weights are changed in place and restored before returning, also on an error.
    """
    from worker.compression.quantization import torch_level_module

    working = torch_level_module(model) if ctx.kind == "graph" else model
    layers = prunable_layers(working)
    cache = UpstreamCache.record(working, probe.inputs, list(layers)) if ctx.kind != "torchscript" else None
    report = progress or (lambda fraction, message: None)
    rows = []
    for index, (name, layer) in enumerate(layers.items()):
        ctx.check_cancelled()
        weight = cast(torch.Tensor, layer.weight)  # a Parameter (TorchScript modules too)
        original = weight.detach().clone()
        results = []
        try:
            for amount in amounts:
                with torch.no_grad():
                    weight.copy_(l1_pruned(original, amount))
                with cache.skipping_before(name) if cache is not None else nullcontext():
                    sqnr, drop = probe.judge(working)
                results.append({"amount": amount, "sqnr_db": sqnr, "accuracy_drop": drop})
        finally:
            with torch.no_grad():
                weight.copy_(original)
        kind = str(getattr(layer, "original_name", None) or type(layer).__name__)
        rows.append({"layer": name, "kind": kind, "parameters": int(original.numel()), "results": results})
        report((index + 1) / max(1, len(layers)), f"pruning sensitivity {index + 1}/{len(layers)}: {name}")
    return sorted(rows, key=lambda row: [harm_key(result) for result in reversed(row["results"])])
