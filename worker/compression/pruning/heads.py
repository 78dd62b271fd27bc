"""ln_structured on transformers: attention heads (`heads`) and MLP channels (`amount`) on the exported graph.

The groups, the slicing and the faithfulness check are in pruning/transformer.py; this
module runs them for a stage: eager models are exported first with the job's declared
dynamic dimensions (so the result is an exported program that runs at any declared
batch and sequence length), the options pick the groups, and fine-tuning follows when
the job asks for it.
"""

from __future__ import annotations

import copy
import fnmatch
from typing import Any

import torch.fx as fx
from torch import nn

from worker.compression.base import EngineError, StageContext
from worker.compression.inputs import export_program
from worker.compression.pruning.finetune import _fit, _fit_figures, _labelled_train_data
from worker.compression.pruning.recurrent import has_recurrent_ops, prune_recurrent
from worker.compression.pruning.transformer import (
    AttentionGroup,
    MlpGroup,
    Projection,
    check_same_outputs,
    find_attention,
    find_mlps,
    masked_reference,
    probe_channels,
    prune_attention,
    prune_mlp,
)


def prune_transformer(model: nn.Module, options: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    """Remove the weakest `heads` fraction of every attention's heads and `amount` of every MLP's
    intermediate channels; the hidden width, embeddings and classifier stay.

    Returns the pruned exported program's module (kind "graph") and the stage figures.
    """
    heads = float(options.get("heads") or 0.0)
    amount = float(options.get("amount", 0.5))
    if options.get("schedule"):
        raise EngineError(
            "gradual pruning (schedule) is not available for transformer heads / MLP channels; "
            "prune in one shot, with `train` to fine-tune afterwards"
        )
    if ctx.kind == "torchscript":
        raise EngineError("ln_structured needs an eager model or an exported program, not TorchScript")
    example = ctx.example_input
    graph = _as_graph(model, ctx)
    attention = probe_channels(graph, find_attention(graph), example) if heads > 0 else []
    attention = [group for group in attention if _chosen(group_layers(group), options)]
    taken = {p.weight for group in find_attention(graph) for p in (*group.sources, group.consumer)}
    mlps = [group for group in find_mlps(graph, taken) if _chosen(group_layers(group), options)] if amount > 0 else []
    if heads > 0 and not attention:
        raise EngineError(
            "heads: the model has no attention this stage can prune: it looks for "
            "scaled_dot_product_attention fed by linear projections through reshapes only "
            "(attention written as matmul + softmax, or q scaled before it, is not followed)"
        )
    if not attention and not mlps and amount > 0 and has_recurrent_ops(graph):
        figures = prune_recurrent(graph, options, ctx)
        if options.get("train"):
            data = _labelled_train_data(ctx, "fine-tuning (train options)")
            figures["finetune"] = _fit_figures(_fit(graph, data, options, None, ctx, 0.0, 1.0))
        return graph, figures
    if not attention and not mlps:
        raise EngineError(
            "ln_structured found nothing to remove in this model: no attention heads and no "
            "Linear -> activation -> Linear pair whose middle channels only feed the next layer "
            "(nor an LSTM / GRU op)"
        )
    original = copy.deepcopy(graph)
    zeroed: dict[str, tuple[Projection, list[int]]] = {}
    attention_rows, mlp_rows, targeted = [], [], []
    for group in attention:
        ctx.check_cancelled()
        kept, removed = prune_attention(graph, group, heads)
        zeroed[group.consumer.weight] = (group.consumer, [c for h in removed for c in group.consumer_channels[h]])
        attention_rows.append(
            {"layer": _owner(group.consumer.weight), "heads_before": group.heads, "heads_after": len(kept)}
            | {"removed_heads": removed}
        )
        targeted.extend(group_layers(group))
    for mlp in mlps:
        ctx.check_cancelled()
        removed_channels = prune_mlp(graph, mlp, amount)
        zeroed[mlp.consumer.weight] = (mlp.consumer, removed_channels)
        mlp_rows.append(
            {
                "layer": _owner(mlp.producer.weight),
                "channels_before": mlp.width,
                "channels_after": mlp.width - len(removed_channels),
            }
        )
        targeted.extend(group_layers(mlp))
    graph.recompile()
    check_same_outputs(graph, masked_reference(original, zeroed), example)
    info: dict[str, Any] = {
        "scheme": "ln_structured",
        "amount": amount,
        "heads": heads,
        "amount_means": "fraction of each transformer MLP's intermediate channels removed",
        "heads_means": "fraction of each attention's heads removed (rounded down, one kept at least)",
        "kept": "hidden width, embeddings and classifier",
        "importance": "L2 norm of all weights of a head / channel (projections in and out)",
        "pruned_as": "exported program (torch.export)",
        "attention": attention_rows,
        "mlp": mlp_rows,
        "targeted": targeted,
    }
    if options.get("train"):
        data = _labelled_train_data(ctx, "fine-tuning (train options)")
        info["finetune"] = _fit_figures(_fit(graph, data, options, None, ctx, 0.0, 1.0))
    return graph, info


def _as_graph(model: nn.Module, ctx: StageContext) -> fx.GraphModule:
    if ctx.kind == "graph":
        assert isinstance(model, fx.GraphModule)  # a graph-kind model is an exported program's module
        return model
    program = export_program(model.eval(), ctx.signature, ctx.example_input)
    graph = program.module()
    assert isinstance(graph, fx.GraphModule)
    return graph


def _owner(target: str) -> str:
    return target.rpartition(".")[0]


def group_layers(group: AttentionGroup | MlpGroup) -> list[str]:
    if isinstance(group, AttentionGroup):
        projections = [*{s.weight: s for s in group.sources}.values(), group.consumer]
    else:
        projections = [group.producer, group.consumer]
    return [_owner(p.weight) for p in projections]


def _chosen(layers: list[str], options: dict[str, Any]) -> bool:
    """A group is pruned when all its layers pass the `layers` include / exclude globs."""
    patterns = options.get("layers") or {}
    include = patterns.get("include") or ["*"]
    exclude = patterns.get("exclude") or []
    return all(
        any(fnmatch.fnmatchcase(name, p) for p in include) and not any(fnmatch.fnmatchcase(name, p) for p in exclude)
        for name in layers
    )
