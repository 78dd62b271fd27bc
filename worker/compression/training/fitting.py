"""`fit`, the entry point of the training loop, and the seeded train/validation split it uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from worker.compression.base import Dataset, EngineError, StageContext
from worker.compression.training.config import TrainConfig, _replace
from worker.compression.training.distributed import _fit_distributed
from worker.compression.training.evaluation import CrossEntropyLoss, _probe_forward
from worker.compression.training.loop import LossFn, _Job, _LocalReporter, _train


def fit(
    model: nn.Module,
    data: Dataset,
    options: dict[str, Any] | TrainConfig | None,
    ctx: StageContext,
    *,
    loss_fn: LossFn | None = None,
    after_step: Callable[[], None] | None = None,
    val_data: Dataset | None = None,
    targets: Tensor | None = None,
    val_targets: Tensor | None = None,
    defaults: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train `model` in place on `data` and return a summary of the run.

    Args:
        model: an eager or exported-graph module (trained where it is, on ctx.device).
        data: training inputs and (for the default loss) labels.
        options: the job spec's "train" object (or an already validated TrainConfig).
        ctx: progress, events, cancellation, device and the default seed.
        loss_fn: loss_fn(model, inputs, targets) -> scalar; default cross-entropy on labels
            with label smoothing.
        after_step: called after every optimizer step (e.g. to re-apply pruning masks).
        val_data: validation set; otherwise `val_split` of `data` is held out.
        targets: what loss_fn receives as its third argument, row-aligned with data.inputs
            (e.g. precomputed teacher logits); default data.labels.
        val_targets: the same for val_data (for a validation loss); default val_data.labels
            when `targets` is the default.
        defaults: a method's own defaults, under the options.
    Returns:
        {"epochs_run", "final_loss", "best_val_accuracy", "last_val_accuracy", "best_epoch",
         "stopped_early", "lr_history" (per epoch, the lr of its first step), "loss_history",
         "val_accuracy_history", "train_samples", "val_samples", "devices", "amp", "seconds"}.
    Example:
        >>> fit(model, Dataset(x, y), {"optimizer": "sgd", "lr": 0.1, "epochs": 3}, ctx)["final_loss"]
    """
    config = options if isinstance(options, TrainConfig) else TrainConfig.from_options(options, defaults)
    if config.seed is None:
        config = _replace(config, seed=ctx.seed)
    if len(data) == 0:
        raise EngineError("the training dataset is empty")
    if loss_fn is None:
        if data.labels is None:
            raise EngineError("training with the default loss needs a dataset with labels")
        loss_fn = CrossEntropyLoss(config.label_smoothing)
    default_targets = targets is None
    val: Dataset | None
    if targets is None:
        targets = data.labels
    elif int(targets.shape[0]) != len(data):
        raise EngineError(f"targets have {targets.shape[0]} rows for {len(data)} samples")
    if val_data is not None:
        if val_targets is None and default_targets:
            val_targets = val_data.labels
        train, val, train_targets = data, val_data, targets
    else:
        fraction = (
            config.val_split
            if config.val_split is not None
            else (0.1 if config.early_stopping_patience is not None else 0.0)
        )
        if config.early_stopping_patience is not None and round(len(data) * fraction) == 0:
            raise EngineError("early stopping needs a validation split: set train.val_split > 0")
        (train, train_targets), (val, val_targets) = split_dataset(data, targets, fraction, config.seed or 0)
    if len(train) == 0:
        raise EngineError("val_split leaves no training samples")
    _probe_forward(model, train.inputs[: config.batch_size])
    job = _Job(model, train, val, train_targets, val_targets, config, loss_fn, after_step, ctx.device)
    if config.devices > 1:
        return _fit_distributed(job, ctx)
    return _train(job, _LocalReporter(ctx), rank=0, world_size=1)


def split_dataset(
    data: Dataset, targets: Tensor | None, fraction: float, seed: int
) -> tuple[tuple[Dataset, Tensor | None], tuple[Dataset | None, Tensor | None]]:
    """Hold out `fraction` of the samples (a seeded random choice): ((train, targets), (val, targets)).

    The validation part is (None, None) when the fraction rounds to no sample.
    Example:
        >>> (train, _), (val, _) = split_dataset(data, None, 0.1, seed=0)
    """
    held_out = round(len(data) * fraction)
    if held_out == 0:
        return (data, targets), (None, None)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    val_index, train_index = order[:held_out], order[held_out:]

    def take(index: Tensor) -> Dataset:
        return Dataset(data.inputs[index], data.labels[index] if data.labels is not None else None)

    return (
        (take(train_index), targets[train_index] if targets is not None else None),
        (take(val_index), targets[val_index] if targets is not None else None),
    )
