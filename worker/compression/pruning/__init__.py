"""Pruning stage (method `prune`): zeros that make the artifact smaller, channels that go away.

Schemes:
- `l1_unstructured`, `random_unstructured`: per layer, the round(amount * n) weights of
  smallest |w| (or random ones) become zero, the rule of torch.nn.utils.prune. The
  mask is computed here and baked straight into the weight, because prune's
  reparametrisation (weight_orig, weight_mask, a forward pre-hook) cannot be put
  on TorchScript modules and leaves nothing behind anyway once removed.
- `global_l1_unstructured`: one magnitude threshold across all chosen layers.
- `nm_semi_structured`: in every group of M consecutive input weights of each output
  row, the N largest |w| stay. On CUDA, 2:4 fp16/bf16 Linear weights become
  torch's semi-structured sparse tensors where torch accepts their shape.
- `ln_structured`: whole output channels / neurons go by their Ln norm, physically,
  with torch-pruning's dependency graph (so the next layer's inputs, batch norms
  and flattened features follow). Exported-program graphs are first "lifted":
  their aten conv / linear / batch_norm / layer_norm calls become calls of real
  nn modules that hold the same parameters, which torch-pruning can trace.

With `schedule`, pruning is gradual (Zhu & Gupta 2017, cubic schedule) with
fine-tuning between steps; with only `train`, one fine-tuning run follows
one-shot pruning. Masks stay fixed during fine-tuning.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from worker.compression.base import EngineError, StageContext, StageResult, with_defaults

# Re-exported: the names other modules, tests and benchmarks import from `worker.compression.pruning`.
from worker.compression.graph_lift import lift_exported_graph as lift_exported_graph
from worker.compression.pruning.figures import _layer_table, count_macs
from worker.compression.pruning.layers import Layer as Layer
from worker.compression.pruning.layers import _matrix_layers, _weight
from worker.compression.pruning.masks import cubic_sparsity as cubic_sparsity
from worker.compression.pruning.masks import magnitude_masks as magnitude_masks
from worker.compression.pruning.masks import nm_mask as nm_mask
from worker.compression.pruning.structured import _prune_channels, prunes_as_graph
from worker.compression.pruning.unstructured import _prune_weights

UNSTRUCTURED = ("l1_unstructured", "random_unstructured", "global_l1_unstructured")
SCHEMES = UNSTRUCTURED + ("nm_semi_structured", "ln_structured")


def run_stage(model: nn.Module, scheme: str, options: dict[str, Any], ctx: StageContext) -> StageResult:
    """Prune `model` by `scheme` and return it with masks baked into plain weights.

    Args:
        model: an eager module, a TorchScript module or an exported program's graph module (ctx.kind).
        scheme: one of SCHEMES.
        options: the validated stage options of modelpress.catalog (amount, layers, prune_classifier,
            schedule, train, norm, n, m).
        ctx: example input, datasets, progress and cancellation.
    Returns:
        StageResult whose info holds a per-layer table ("layers"), "macs_before" / "macs_after"
        and the scheme's figures; unstructured and N:M results prefer the sparse_state_dict format.
    Example:
        >>> run_stage(model, "l1_unstructured", {"amount": 0.8, "layers": None, "prune_classifier": False,
        ...           "schedule": None, "train": None}, ctx).info["sparsity"]
        0.8
    """
    if scheme not in SCHEMES:
        raise EngineError(f"unknown pruning scheme {scheme!r}; known schemes: {list(SCHEMES)}")
    options = with_defaults("prune", scheme, options)
    kind = ctx.kind
    as_graph = scheme == "ln_structured" and kind != "torchscript" and prunes_as_graph(model, kind, options)
    # one MAC counter before and after: the graph's when the result is a graph
    macs_before = count_macs(model, "graph" if as_graph else kind, ctx.example_input)
    shapes_before = {name: list(_weight(module).shape) for name, module in _matrix_layers(model)}
    if scheme == "ln_structured":
        model, info = _prune_channels(model, options, ctx)
        kind = "graph" if as_graph else kind  # transformers come back as their pruned exported graph
        preferred = None
    else:
        info = _prune_weights(model, scheme, options, ctx)
        preferred = "sparse_state_dict"
    macs_after = count_macs(model, kind, ctx.example_input)
    targeted = set(info.pop("targeted"))
    info["layers"] = _layer_table(model, shapes_before, targeted)
    emptied = [row["layer"] for row in info["layers"] if row["sparsity"] == 1.0 and row["layer"] in targeted]
    if emptied:
        # Global thresholds can take all of a layer whose weights are small everywhere.
        info["warnings"] = [
            f"layer {name} has no nonzero weights left; its output no longer depends on its input" for name in emptied
        ]
    info.update(
        macs_before=macs_before["macs"],
        macs_after=macs_after["macs"],
        macs_counter=macs_after["counter"],
        macs_input_shape=macs_after["input_shape"],
    )
    ctx.progress(1.0, "pruned")
    return StageResult(model=model, kind=kind, info=info, preferred_output_format=preferred)
