"""Fine-tuning between and after pruning steps (the glue to worker.compression.training)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from worker.compression import breadcrumbs
from worker.compression.base import Dataset, EngineError, StageContext
from worker.compression.training import fit

# ---------------------------------------------------------------- training glue


def _schedule_lengths(schedule: dict[str, Any]) -> tuple[int, int]:
    steps, epochs = schedule.get("steps", 1), schedule.get("finetune_epochs", 1)
    if not isinstance(steps, int) or steps < 1 or not isinstance(epochs, int) or epochs < 0:
        raise EngineError("schedule needs integer steps >= 1 and finetune_epochs >= 0")
    return steps, epochs


def _labelled_train_data(ctx: StageContext, purpose: str) -> Dataset:
    data = ctx.train_data
    if data is None or data.labels is None:
        raise EngineError(f"{purpose} fine-tunes the model, so the job needs a dataset_id with labels")
    return data


def _fit(
    model: nn.Module,
    data: Dataset,
    options: dict[str, Any],
    epochs: int | None,
    ctx: StageContext,
    start: float,
    span: float,
    after_step: Callable[[], None] | None = None,
) -> dict[str, Any]:
    train_options = dict(options.get("train") or {})
    if epochs is not None:
        train_options["epochs"] = epochs

    def progress(fraction: float, message: str) -> None:
        ctx.progress(start + span * fraction, message)

    breadcrumbs.operation(f"fine-tuning ({train_options.get('epochs', 'default')} epochs)")
    summary: dict[str, Any] = fit(
        model,
        data,
        train_options,
        dataclasses.replace(ctx, progress=progress),
        after_step=after_step,
        val_data=ctx.eval_data,
    )
    return summary


def _fit_figures(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("epochs_run", "final_loss", "last_val_accuracy", "best_val_accuracy")
    return {key: summary.get(key) for key in keys}
