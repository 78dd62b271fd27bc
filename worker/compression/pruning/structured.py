"""ln_structured: whole output channels removed with torch-pruning's dependency graph."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from worker.compression.base import Dataset, EngineError, StageContext
from worker.compression.graph_lift import lift_exported_graph
from worker.compression.inputs import Batch, batch_of, call_model, select_output
from worker.compression.pruning.finetune import _fit, _fit_figures, _labelled_train_data, _schedule_lengths
from worker.compression.pruning.layers import _chosen_layers, _device_of, _last_line, _matrix_layers
from worker.compression.pruning.masks import cubic_sparsity

# ---------------------------------------------------------------- structured


def _prune_channels(model: nn.Module, options: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    import torch_pruning as tp

    if ctx.kind == "torchscript":
        raise EngineError(
            "ln_structured removes channels and so changes the model's code, which a TorchScript "
            "file does not expose; upload a state_dict with a registered architecture or an "
            "exported program (torch.export) instead"
        )
    if prunes_as_graph(model, ctx.kind, options):
        from worker.compression.pruning.heads import prune_transformer

        return prune_transformer(model, options, ctx)
    if options.get("prune_classifier"):
        raise EngineError(
            "ln_structured removes whole output neurons; on the final classifier that would remove "
            "classes. Set prune_classifier to false"
        )
    example = ctx.example_input.to(_device_of(model))
    batches = [example]
    if example.dim() >= 1:
        batches.append(example[:1] if len(example) > 1 else batch_of(example, 2))
    if ctx.kind == "graph":
        with torch.no_grad():
            expected = _first_tensor(call_model(model, example))
        # The graph's ops carry the mode it was exported in (training batch norm is refused).
        assert isinstance(model, torch.fx.GraphModule)  # a graph-kind model is an exported program's module
        model = lift_exported_graph(model).eval()
        with torch.no_grad():
            lifted = _first_tensor(call_model(model, example))
        if lifted.shape != expected.shape or not torch.allclose(lifted, expected, rtol=1e-4, atol=1e-5):
            raise EngineError(
                "the exported program could not be rebuilt from nn modules faithfully, so its "
                "channels cannot be removed; upload a state_dict with a registered architecture"
            )
    layers = _chosen_layers(model, options)
    targeted = {id(module) for _, module in layers}
    ignored = [module for _, module in _matrix_layers(model) if id(module) not in targeted]
    amount = float(options["amount"])
    norm = float(options["norm"])
    schedule = options.get("schedule")
    steps, epochs = _schedule_lengths(schedule) if schedule else (1, 0)
    if schedule and epochs:
        data: Dataset | None = _labelled_train_data(ctx, "gradual pruning")
    elif not schedule and options.get("train"):
        data = _labelled_train_data(ctx, "fine-tuning (train options)")
    else:
        data = None
    # Batch sizes the model ran on before must still work after (a graph may allow only some).
    reference_shapes = _output_shapes(model, batches)
    was_training = model.training
    try:
        pruner = tp.pruner.MetaPruner(
            model,
            example,
            forward_fn=call_model,
            output_transform=_first_tensor,
            importance=tp.importance.MagnitudeImportance(p=norm),
            pruning_ratio=amount,
            ignored_layers=ignored,
            iterative_steps=steps,
            iterative_pruning_ratio_scheduler=lambda ratio, n: [cubic_sparsity(t, n, ratio) for t in range(n + 1)],
        )
    except Exception as error:
        raise EngineError(
            f"torch-pruning could not trace the model's channel dependencies: {_last_line(error)}"
        ) from error
    history = []
    for step in range(1, steps + 1):
        ctx.check_cancelled()
        target = cubic_sparsity(step, steps, amount)
        ctx.progress((step - 1) / steps, f"step {step}/{steps}: removing {target:.0%} of channels")
        try:
            pruner.step()
        except Exception as error:
            raise EngineError(f"torch-pruning failed to remove channels: {_last_line(error)}") from error
        record: dict[str, Any] = {"step": step, "target_channel_ratio": round(target, 6)}
        if schedule and data is not None:
            record.update(_fit_figures(_fit(model, data, options, epochs, ctx, (step - 1) / steps, 1 / steps)))
        history.append(record)
    model.train(was_training)
    _check_still_runs(model, batches, reference_shapes)
    info: dict[str, Any] = {
        "scheme": "ln_structured",
        "amount": amount,
        "norm": norm,
        "amount_means": "fraction of output channels removed from each targeted layer",
        "targeted": [name for name, _ in layers],
    }
    if schedule:
        info["schedule"] = history
    elif data is not None:
        info["finetune"] = _fit_figures(_fit(model, data, options, None, ctx, 0.0, 1.0))
    return model, info


def prunes_as_graph(model: nn.Module, kind: str, options: dict[str, Any]) -> bool:
    """Transformers (attention, token embeddings, or `heads` asked for) and LSTM / GRU models are pruned
    on the exported graph."""
    return _is_transformer(model, kind) or float(options.get("heads") or 0.0) > 0 or _is_recurrent(model, kind)


def _is_recurrent(model: nn.Module, kind: str) -> bool:
    from worker.compression.pruning.recurrent import has_recurrent_ops

    if kind == "graph":
        assert isinstance(model, torch.fx.GraphModule)  # a graph-kind model is an exported program's module
        return has_recurrent_ops(model)
    return any(isinstance(module, (nn.LSTM, nn.GRU)) for module in model.modules())


def _is_transformer(model: nn.Module, kind: str) -> bool:
    """Attention or token embeddings: the transformer path (heads and MLP channels on the exported graph)."""
    if kind == "graph":
        assert isinstance(model, torch.fx.GraphModule)  # a graph-kind model is an exported program's module
        targets = {node.target for node in model.graph.nodes if node.op == "call_function"}
        aten = torch.ops.aten
        return bool(targets & {aten.scaled_dot_product_attention.default, aten.embedding.default})
    return any(
        isinstance(module, (nn.MultiheadAttention, nn.Embedding)) or type(module).__name__.endswith("Attention")
        for module in model.modules()
    )


def _first_tensor(output: Any) -> Tensor:
    return select_output(output)


def _output_shapes(model: nn.Module, batches: Sequence[Batch]) -> list[list[int] | None]:
    shapes: list[list[int] | None] = []
    for batch in batches:
        try:
            with torch.no_grad():
                shapes.append(list(_first_tensor(call_model(model, batch)).shape))
        except Exception:
            shapes.append(None)
    return shapes


def _check_still_runs(model: nn.Module, batches: Sequence[Batch], reference: Sequence[list[int] | None]) -> None:
    """The pruned model must give outputs of the same shapes on the inputs the original ran on."""
    for batch, expected in zip(batches, reference):
        if expected is None:
            continue
        try:
            with torch.no_grad():
                shape = list(_first_tensor(call_model(model, batch)).shape)
        except Exception as error:
            raise EngineError(
                f"after removing channels the model no longer runs on inputs of shape "
                f"{list(batch.shape)}: {_last_line(error)}. It may hard-code channel counts "
                f"(reshape to fixed sizes); exclude those layers with layers.exclude"
            ) from error
        if shape != expected:
            raise EngineError(
                f"after removing channels the model's output has shape {shape} instead of "
                f"{expected}; exclude the output layers with layers.exclude"
            )
