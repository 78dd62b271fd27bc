"""Unstructured and N:M pruning: masks baked into the weights, gradually or at once, with fine-tuning."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from worker.compression.base import EngineError, StageContext
from worker.compression.pruning.finetune import _fit, _fit_figures, _labelled_train_data, _schedule_lengths
from worker.compression.pruning.layers import Layer, _chosen_layers, _weight
from worker.compression.pruning.masks import _apply_masks, _mask_keeper, cubic_sparsity, magnitude_masks, nm_mask

# ---------------------------------------------------------------- unstructured and N:M


def _prune_weights(model: nn.Module, scheme: str, options: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    layers = _chosen_layers(model, options)
    info: dict[str, Any] = {"scheme": scheme}
    if scheme == "nm_semi_structured":
        n, m = int(options["n"]), int(options["m"])
        fitting = [(name, module) for name, module in layers if _weight(module)[0].numel() % m == 0]
        skipped = [name for name, module in layers if _weight(module)[0].numel() % m]
        if not fitting:
            raise EngineError(
                f"no chosen layer has a number of inputs divisible by m={m} "
                f"({', '.join(skipped)}); choose other layers or another m"
            )
        weights = [_weight(module) for _, module in fitting]
        masks = [nm_mask(weight, n, m) for weight in weights]
        _apply_masks(weights, masks)
        info.update(n=n, m=m, skipped_layers=skipped)
        info.update(_finetune_once(model, weights, masks, options, ctx))
        info["semi_structured_layers"] = _to_semi_structured_on_cuda(fitting, ctx) if (n, m) == (2, 4) else []
        layers = fitting
    else:
        amount = float(options["amount"])
        weights = [_weight(module) for _, module in layers]
        schedule = options.get("schedule")
        if schedule:
            info["schedule"] = _gradual_unstructured(model, scheme, weights, amount, schedule, options, ctx)
        else:
            masks = _unstructured_masks(scheme, weights, amount, None, ctx.seed)
            _apply_masks(weights, masks)
            info.update(_finetune_once(model, weights, masks, options, ctx))
        info["amount"] = amount
    zeros = sum(int((_weight(module) == 0).sum()) for _, module in layers)
    total = sum(_weight(module).numel() for _, module in layers)
    info["sparsity"] = round(zeros / total, 6)
    info["targeted"] = [name for name, _ in layers]
    return info


def _unstructured_masks(
    scheme: str, weights: Sequence[Tensor], amount: float, previous: Sequence[Tensor] | None, seed: int
) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed) if scheme == "random_unstructured" else None
    return magnitude_masks(
        weights,
        amount,
        global_scope=scheme == "global_l1_unstructured",
        random=scheme == "random_unstructured",
        previous=previous,
        generator=generator,
    )


def _gradual_unstructured(
    model: nn.Module,
    scheme: str,
    weights: Sequence[Tensor],
    amount: float,
    schedule: dict[str, Any],
    options: dict[str, Any],
    ctx: StageContext,
) -> list[dict[str, Any]]:
    steps, epochs = _schedule_lengths(schedule)
    data = _labelled_train_data(ctx, "gradual pruning")
    masks: list[Tensor] | None = None
    history = []
    for step in range(1, steps + 1):
        ctx.check_cancelled()
        target = cubic_sparsity(step, steps, amount)
        ctx.progress((step - 1) / steps, f"step {step}/{steps}: pruning to {target:.3f}")
        masks = _unstructured_masks(scheme, weights, target, masks, ctx.seed + step)
        _apply_masks(weights, masks)
        record: dict[str, Any] = {"step": step, "target_sparsity": round(target, 6)}
        if epochs:
            summary = _fit(
                model,
                data,
                options,
                epochs,
                ctx,
                (step - 1) / steps,
                1 / steps,
                after_step=_mask_keeper(weights, masks),
            )
            record.update(_fit_figures(summary))
        history.append(record)
    return history


def _finetune_once(
    model: nn.Module, weights: Sequence[Tensor], masks: Sequence[Tensor], options: dict[str, Any], ctx: StageContext
) -> dict[str, Any]:
    """One fine-tuning run with masks held, when the stage has `train` options and no schedule."""
    if not options.get("train"):
        return {}
    data = _labelled_train_data(ctx, "fine-tuning (train options)")
    summary = _fit(model, data, options, None, ctx, 0.0, 1.0, after_step=_mask_keeper(weights, masks))
    return {"finetune": _fit_figures(summary)}


def _to_semi_structured_on_cuda(layers: Sequence[Layer], ctx: StageContext) -> list[str]:
    """Swap 2:4 fp16/bf16 Linear weights on CUDA for torch's semi-structured sparse tensors.

    The speed-up is real only there (cuSPARSELt / CUTLASS kernels); layers whose shape
    or dtype torch refuses stay dense. The artifact stores their dense values.
    """
    if ctx.device.type != "cuda" or not torch.cuda.is_available():
        return []
    from torch.sparse import to_sparse_semi_structured

    converted = []
    for name, module in layers:
        weight = module._parameters.get("weight") if isinstance(module, nn.Linear) else None
        if weight is None or not weight.is_cuda or weight.dtype not in (torch.float16, torch.bfloat16):
            continue
        try:
            module.weight = nn.Parameter(to_sparse_semi_structured(weight.detach()), requires_grad=False)
        except (RuntimeError, ValueError, NotImplementedError):
            continue
        converted.append(name)
    return converted
