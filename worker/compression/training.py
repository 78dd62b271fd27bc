"""The one training loop: fine-tuning after pruning, quantization-aware training, distillation.

`fit(model, data, options, ctx)` trains in place and returns a summary. Options
are the job spec's "train" object, validated into a frozen `TrainConfig`.
Learning rates are set per optimizer step by `learning_rate`, a closed-form
schedule, so the recorded history can be checked against the formulas.
`devices > 1` trains data-parallel with DistributedDataParallel in processes
the worker starts itself (gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import multiprocessing
import os
import queue as queue_module
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worker.compression.base import Dataset, EngineError, JobCancelled, StageContext
from worker.compression.inputs import Batch, ModelInputs, call_model, select_output

LossFn = Callable[[nn.Module, Batch, Tensor | None], Tensor]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("none", "step", "multistep", "exponential", "cosine", "plateau")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Cancellation (and, data-parallel, the agreement on it) every this many batches.
CANCEL_CHECK_BATCHES = 20
# Default decay factor per schedule when "gamma" is not given.
_DEFAULT_GAMMA = {"step": 0.1, "multistep": 0.1, "exponential": 0.95, "plateau": 0.1}
# Relative improvement a plateau schedule needs to count an epoch as better (torch's default).
_PLATEAU_THRESHOLD = 1e-4


@dataclass(frozen=True)
class TrainConfig:
    """Validated training options; every field can be given in the job spec's "train" object.

    Schedules count epochs from the end of the warmup (as torch's SequentialLR does):
    `step` multiplies by `gamma` every `step_size` epochs, `multistep` at each of
    `milestones`, `exponential` every epoch, `cosine` anneals per step to `min_lr`
    over the epochs after the warmup, `plateau` multiplies by `gamma` when the
    monitored loss (validation if there is a split, else training) has not improved
    for more than `plateau_patience` epochs.

    With `devices` > 1, `batch_size` is per process (as in DDP): each optimizer step sees
    devices x batch_size samples and an epoch has 1/devices as many steps.
    """

    optimizer: str = "adamw"
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    epochs: int = 5
    batch_size: int = 64
    weight_decay: float = 0.0
    l1: float = 0.0
    label_smoothing: float = 0.0
    schedule: str = "none"
    step_size: int = 10
    gamma: float | None = None
    milestones: tuple[int, ...] = ()
    min_lr: float = 0.0
    plateau_patience: int = 5
    warmup_epochs: int = 0
    early_stopping_patience: int | None = None
    # Fraction of the data held out for validation when no validation set is given;
    # None means 0.1 with early stopping and 0 otherwise.
    val_split: float | None = None
    grad_clip: float | None = None
    amp: str | None = None
    seed: int | None = None
    shuffle: bool = True
    devices: int = 1

    @classmethod
    def from_options(cls, options: dict[str, Any] | None, defaults: dict[str, Any] | None = None) -> TrainConfig:
        """Validate a "train" object (over `defaults`, e.g. a method's own budget).

        Example:
            >>> TrainConfig.from_options({"optimizer": "sgd", "lr": 0.1, "schedule": "cosine"})
        """
        if not isinstance(options, (dict, type(None))):
            raise EngineError("train options must be an object")
        merged: dict[str, Any] = dict(defaults or {})
        given = dict(options or {})
        schedule = given.get("schedule")
        if isinstance(schedule, dict):
            # {"schedule": {"name": "step", "step_size": 5}} is the same as flat keys.
            schedule = dict(schedule)
            if "name" not in schedule:
                raise EngineError('train.schedule as an object needs a "name"')
            given["schedule"] = schedule.pop("name")
            for key, value in schedule.items():
                given.setdefault(key, value)
        merged.update(given)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise EngineError(f"unknown train option(s) {unknown}; known: {sorted(known)}")
        if "milestones" in merged and merged["milestones"] is not None:
            milestones = merged["milestones"]
            if not isinstance(milestones, (list, tuple)) or not all(_is_int(m) and m > 0 for m in milestones):
                raise EngineError("train.milestones must be a list of positive integers (epochs)")
            merged["milestones"] = tuple(sorted(int(m) for m in milestones))
        if merged.get("amp") in ("none", False):
            merged["amp"] = None
        config = cls(
            **{
                k: v
                for k, v in merged.items()
                if v is not None or k in ("gamma", "early_stopping_patience", "val_split", "grad_clip", "amp", "seed")
            }
        )
        config._check()
        if config.gamma is None and config.schedule in _DEFAULT_GAMMA:
            config = _replace(config, gamma=_DEFAULT_GAMMA[config.schedule])
        return config

    def _check(self) -> None:
        _expect(
            self.optimizer in OPTIMIZERS, f"train.optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}"
        )
        _expect(self.schedule in SCHEDULES, f"train.schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        _expect(
            self.amp is None or self.amp in AMP_DTYPES,
            f"train.amp must be one of {list(AMP_DTYPES)} or none, got {self.amp!r}",
        )
        _expect(_is_number(self.lr) and self.lr > 0, f"train.lr must be a positive number, got {self.lr!r}")
        for name in ("momentum", "weight_decay", "l1", "min_lr"):
            value = getattr(self, name)
            _expect(_is_number(value) and value >= 0, f"train.{name} must be a number >= 0, got {value!r}")
        _expect(self.momentum < 1, f"train.momentum must be < 1, got {self.momentum}")
        _expect(
            _is_number(self.label_smoothing) and 0 <= self.label_smoothing < 1,
            f"train.label_smoothing must be in [0, 1), got {self.label_smoothing!r}",
        )
        for name, low in (
            ("epochs", 1),
            ("batch_size", 1),
            ("step_size", 1),
            ("plateau_patience", 0),
            ("warmup_epochs", 0),
            ("devices", 1),
        ):
            value = getattr(self, name)
            _expect(_is_int(value) and value >= low, f"train.{name} must be an integer >= {low}, got {value!r}")
        _expect(
            self.warmup_epochs < self.epochs or self.warmup_epochs == 0,
            f"train.warmup_epochs ({self.warmup_epochs}) must be fewer than train.epochs ({self.epochs})",
        )
        _expect(
            self.gamma is None or (_is_number(self.gamma) and 0 < self.gamma <= 1),
            f"train.gamma must be in (0, 1], got {self.gamma!r}",
        )
        _expect(
            self.schedule != "multistep" or bool(self.milestones),
            "train.schedule 'multistep' needs train.milestones, e.g. [30, 60]",
        )
        _expect(
            self.early_stopping_patience is None
            or (_is_int(self.early_stopping_patience) and self.early_stopping_patience >= 1),
            f"train.early_stopping_patience must be an integer >= 1, got {self.early_stopping_patience!r}",
        )
        _expect(
            self.val_split is None or (_is_number(self.val_split) and 0 <= self.val_split < 1),
            f"train.val_split must be in [0, 1), got {self.val_split!r}",
        )
        _expect(
            self.grad_clip is None or (_is_number(self.grad_clip) and self.grad_clip > 0),
            f"train.grad_clip must be a positive number, got {self.grad_clip!r}",
        )
        _expect(self.seed is None or _is_int(self.seed), f"train.seed must be an integer, got {self.seed!r}")
        for name in ("nesterov", "shuffle"):
            _expect(isinstance(getattr(self, name), bool), f"train.{name} must be true or false")
        _expect(
            not self.nesterov or (self.optimizer == "sgd" and self.momentum > 0),
            "train.nesterov needs optimizer 'sgd' with momentum > 0",
        )


def learning_rate(config: TrainConfig, step: int, steps_per_epoch: int, plateau_scale: float = 1.0) -> float:
    """The learning rate of optimizer step `step` (0-based) under `config`'s warmup and schedule.

    Args:
        config: the validated options.
        step: optimizer steps taken so far.
        steps_per_epoch: optimizer steps in one epoch.
        plateau_scale: the product of the reductions a `plateau` schedule has made.
    Returns:
        The learning rate for that step.
    Example:
        >>> learning_rate(TrainConfig(lr=0.1, schedule="step", step_size=2, gamma=0.5), 40, 10)
        0.025
    """
    warmup_steps = config.warmup_epochs * steps_per_epoch
    if step < warmup_steps:
        return config.lr * (step + 1) / warmup_steps
    after = step - warmup_steps
    epoch = after // steps_per_epoch
    gamma = config.gamma if config.gamma is not None else _DEFAULT_GAMMA.get(config.schedule, 1.0)
    if config.schedule == "step":
        return config.lr * gamma ** (epoch // config.step_size)
    if config.schedule == "multistep":
        return config.lr * gamma ** sum(epoch >= m for m in config.milestones)
    if config.schedule == "exponential":
        return config.lr * gamma**epoch
    if config.schedule == "cosine":
        total = max(1, (config.epochs - config.warmup_epochs) * steps_per_epoch)
        return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1 + math.cos(math.pi * min(after, total) / total))
    if config.schedule == "plateau":
        return max(config.min_lr, config.lr * plateau_scale)
    return config.lr


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


def evaluate_accuracy(model: nn.Module, data: Dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy of `model` on a labelled dataset, in [0, 1].

    Works for eager, exported-graph and TorchScript modules; runs on the model's device.
    Example:
        >>> evaluate_accuracy(model, Dataset(x, y))
    """
    if data.labels is None:
        raise EngineError("accuracy needs a dataset with labels")
    if len(data) == 0:
        raise EngineError("accuracy needs a non-empty dataset")
    device = module_device(model)
    was_training = bool(getattr(model, "training", False))
    set_training_mode(model, False)
    correct = 0
    try:
        with torch.no_grad():
            for start in range(0, len(data), batch_size):
                inputs = data.inputs[start : start + batch_size].to(device)
                predicted = logits_of(call_model(model, inputs)).argmax(dim=1).cpu()
                correct += int((predicted == data.labels[start : start + batch_size]).sum())
    finally:
        if was_training:
            set_training_mode(model, True)
    return correct / len(data)


def set_training_mode(model: nn.Module, training: bool) -> None:
    """model.train(training), also for exported-graph modules (which refuse train() and eval())."""
    try:
        model.train(training)
    except NotImplementedError:
        graph = getattr(model, "graph", None)
        mode_dependent = ("dropout", "batch_norm")
        if graph is None or not any(op in str(node.target) for node in graph.nodes for op in mode_dependent):
            return  # nothing in the graph behaves differently in training
        try:
            from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train
        except ImportError:  # without torchao, graphs keep the mode they were exported in
            return
        (move_exported_model_to_train if training else move_exported_model_to_eval)(model)


class CrossEntropyLoss:
    """The default loss: cross-entropy of the model's logits against integer labels."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def __call__(self, model: nn.Module, inputs: Batch, labels: Tensor | None) -> Tensor:
        if labels is None:
            raise EngineError("the default loss needs labels")
        return F.cross_entropy(logits_of(call_model(model, inputs)), labels, label_smoothing=self.label_smoothing)


# ---------------------------------------------------------------- the loop


@dataclass
class _Job:
    model: nn.Module
    train: Dataset
    val: Dataset | None
    train_targets: Tensor | None
    val_targets: Tensor | None
    config: TrainConfig
    loss_fn: LossFn
    after_step: Callable[[], None] | None
    device: torch.device


class _Reporter(Protocol):
    def progress(self, fraction: float, message: str) -> None: ...
    def event(self, kind: str, data: dict[str, Any]) -> None: ...
    def check_cancelled(self) -> None: ...


class _LocalReporter:
    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx

    def progress(self, fraction: float, message: str) -> None:
        self.ctx.progress(fraction, message)

    def event(self, kind: str, data: dict[str, Any]) -> None:
        self.ctx.event(kind, data)

    def check_cancelled(self) -> None:
        self.ctx.check_cancelled()


def _train(job: _Job, reporter: _Reporter, *, rank: int, world_size: int) -> dict[str, Any]:
    config, device = job.config, torch.device(job.device)
    started = time.monotonic()
    torch.manual_seed(config.seed or 0)
    original_device = module_device(job.model)
    core = job.model.to(device)
    trained: nn.Module = core
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(core, device_ids=[device.index] if device.type == "cuda" else None)
    parameters = [p for p in core.parameters() if p.requires_grad]
    if not parameters:
        raise EngineError("the model has no trainable parameters")
    optimizer = _make_optimizer(config, parameters)
    amp_dtype = AMP_DTYPES[config.amp] if config.amp and device.type == "cuda" else None
    if config.amp and amp_dtype is None:
        reporter.event("log", {"message": f"amp {config.amp} needs CUDA; training in float32 on {device.type}"})
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    l1_weights = [p for p in parameters if p.dim() >= 2]

    generator = torch.Generator().manual_seed(config.seed or 0)
    n = len(job.train)
    per_rank = math.ceil(n / world_size)
    steps_per_epoch = math.ceil(per_rank / config.batch_size)
    step = 0
    plateau_scale, plateau_best, plateau_bad = 1.0, math.inf, 0
    best_score, best_epoch, best_state, epochs_without_gain = -math.inf, 0, None, 0
    history: dict[str, list[Any]] = {"lr": [], "loss": [], "val_accuracy": []}
    stopped_early = False

    for epoch in range(config.epochs):
        _check_cancelled(reporter, world_size, device)
        set_training_mode(core, True)
        order = torch.randperm(n, generator=generator) if config.shuffle else torch.arange(n)
        # Every rank takes the same number of steps (DDP needs it): pad by wrapping around.
        order = order.repeat(math.ceil(per_rank * world_size / n))[: per_rank * world_size][rank::world_size]
        loss_sum, loss_count = torch.zeros((), device=device), 0
        for batch in range(steps_per_epoch):
            if batch and batch % CANCEL_CHECK_BATCHES == 0:
                _check_cancelled(reporter, world_size, device)
            lr = learning_rate(config, step, steps_per_epoch, plateau_scale)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if batch == 0:
                history["lr"].append(lr)
            index = order[batch * config.batch_size : (batch + 1) * config.batch_size]
            inputs = job.train.inputs[index].to(device, non_blocking=True)
            batch_targets = (
                job.train_targets[index].to(device, non_blocking=True) if job.train_targets is not None else None
            )
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = job.loss_fn(trained, inputs, batch_targets)
            objective = loss.float()
            if config.l1:
                objective = objective + config.l1 * sum(w.abs().sum() for w in l1_weights)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(objective).backward()  # type: ignore[no-untyped-call]  # torch leaves this unannotated
                scaler.unscale_(optimizer)
            else:
                objective.backward()  # type: ignore[no-untyped-call]  # torch leaves this unannotated
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if job.after_step is not None:
                job.after_step()
            loss_sum += loss.detach().float() * len(index)
            loss_count += len(index)
            step += 1
        epoch_loss = _mean_across_ranks(loss_sum, loss_count, world_size, device)
        if not math.isfinite(epoch_loss):
            raise EngineError(f"training diverged at epoch {epoch + 1} (loss {epoch_loss}); lower train.lr")

        val_accuracy, val_loss = _validate(core, job, device)
        history["loss"].append(epoch_loss)
        history["val_accuracy"].append(val_accuracy)
        monitored = val_loss if val_loss is not None else epoch_loss
        if config.schedule == "plateau" and epoch >= config.warmup_epochs:
            if monitored < plateau_best * (1 - _PLATEAU_THRESHOLD):
                plateau_best, plateau_bad = monitored, 0
            else:
                plateau_bad += 1
                if plateau_bad > config.plateau_patience:
                    plateau_scale *= config.gamma or _DEFAULT_GAMMA["plateau"]
                    plateau_bad = 0
        score = val_accuracy if val_accuracy is not None else (-val_loss if val_loss is not None else None)
        if score is not None and score > best_score:
            best_score, best_epoch, epochs_without_gain = score, epoch + 1, 0
            if config.early_stopping_patience is not None:
                best_state = copy.deepcopy(core.state_dict())
        else:
            epochs_without_gain += 1
        reporter.event(
            "epoch",
            {
                "epoch": epoch + 1,
                "loss": epoch_loss,
                "val_accuracy": val_accuracy,
                "val_loss": val_loss,
                "lr": history["lr"][-1],
            },
        )
        accuracy_text = f", val accuracy {val_accuracy:.4f}" if val_accuracy is not None else ""
        reporter.progress(
            (epoch + 1) / config.epochs, f"epoch {epoch + 1}/{config.epochs}: loss {epoch_loss:.4f}{accuracy_text}"
        )
        if (
            config.early_stopping_patience is not None
            and score is not None
            and epochs_without_gain >= config.early_stopping_patience
        ):
            stopped_early = True
            reporter.progress(1.0, f"early stop after epoch {epoch + 1}: no gain for {epochs_without_gain} epochs")
            break

    if best_state is not None:
        core.load_state_dict(best_state)
    set_training_mode(core, False)
    core.to(original_device)
    accuracies = [a for a in history["val_accuracy"] if a is not None]
    return {
        "epochs_run": len(history["loss"]),
        "final_loss": history["loss"][-1],
        "best_val_accuracy": max(accuracies) if accuracies else None,
        "last_val_accuracy": accuracies[-1] if accuracies else None,
        "best_epoch": best_epoch or None,
        "stopped_early": stopped_early,
        "restored_best": best_state is not None,
        "lr_history": history["lr"],
        "loss_history": history["loss"],
        "val_accuracy_history": history["val_accuracy"],
        "train_samples": len(job.train),
        "val_samples": len(job.val) if job.val is not None else 0,
        "devices": world_size,
        "amp": config.amp if amp_dtype is not None else None,
        "seconds": round(time.monotonic() - started, 3),
        "config": asdict(config),
    }


def _validate(model: nn.Module, job: _Job, device: torch.device) -> tuple[float | None, float | None]:
    """Validation accuracy (with labels) and loss (with targets) of the unwrapped model."""
    if job.val is None or len(job.val) == 0:
        return None, None
    accuracy = evaluate_accuracy(model, job.val) if job.val.labels is not None else None
    val_loss = None
    if job.val_targets is not None:
        set_training_mode(model, False)
        total = 0.0
        with torch.no_grad():
            for start in range(0, len(job.val), 256):
                inputs = job.val.inputs[start : start + 256].to(device)
                batch_targets = job.val_targets[start : start + 256].to(device)
                total += float(job.loss_fn(model, inputs, batch_targets)) * int(inputs.shape[0])
        val_loss = total / len(job.val)
    return accuracy, val_loss


def _make_optimizer(config: TrainConfig, parameters: list[nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            parameters,
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay,
        )
    if config.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)


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


# ---------------------------------------------------------------- data-parallel


class _CancelFlag(Protocol):
    def is_set(self) -> bool: ...


class _QueueReporter:
    """What a rank reports: rank 0 forwards progress and events to the parent; all share the cancel flag."""

    def __init__(self, rank: int, messages: Any, cancelled: _CancelFlag) -> None:
        self.rank, self.messages, self.cancelled = rank, messages, cancelled

    def progress(self, fraction: float, message: str) -> None:
        if self.rank == 0:
            self.messages.put(("progress", fraction, message))

    def event(self, kind: str, data: dict[str, Any]) -> None:
        if self.rank == 0:
            self.messages.put(("event", kind, data))

    def check_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise JobCancelled()


def _check_cancelled(reporter: _Reporter, world_size: int, device: torch.device) -> None:
    if world_size == 1:
        reporter.check_cancelled()
        return
    # Ranks must agree, or one would leave while the others wait in all_reduce.
    import torch.distributed as dist

    try:
        reporter.check_cancelled()
        flag = torch.zeros(1, device=device)
    except JobCancelled:
        flag = torch.ones(1, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() > 0:
        raise JobCancelled()


def _mean_across_ranks(loss_sum: Tensor, count: int, world_size: int, device: torch.device) -> float:
    if world_size == 1:
        return float(loss_sum) / count
    import torch.distributed as dist

    totals = torch.stack([loss_sum.float(), torch.tensor(float(count), device=device)])
    dist.all_reduce(totals)
    return float(totals[0] / totals[1])


def _fit_distributed(job: _Job, ctx: StageContext) -> dict[str, Any]:
    """Run `_train` in `devices` processes with DDP; relay their reports and the cancellation."""
    world_size = job.config.devices
    device = torch.device(job.device)
    if device.type == "cuda":
        available = torch.cuda.device_count()
        if available < world_size:
            raise EngineError(f"train.devices is {world_size} but this worker has {available} CUDA device(s)")
        # CUDA cannot be forked: the job goes to fresh processes, so it must pickle.
        start_method = "spawn"
        try:
            import pickle

            pickle.dumps(job)
        except Exception as error:
            raise EngineError(f"data-parallel CUDA training needs a picklable model and loss: {error}") from error
    else:
        # Forked ranks share the parent's objects (closures, graph modules) without pickling.
        start_method = "fork"
    mp_context = multiprocessing.get_context(start_method)
    messages = mp_context.Queue()
    cancelled = mp_context.Event()
    with tempfile.TemporaryDirectory(prefix="modelpress-ddp-") as folder:
        result_path = Path(folder) / "result.pt"
        port = _free_port()
        from torch.multiprocessing.spawn import ProcessException, start_processes

        processes = start_processes(  # type: ignore[no-untyped-call]  # torch leaves this unannotated
            _distributed_worker,
            args=(world_size, port, job, messages, cancelled, str(result_path)),
            nprocs=world_size,
            join=False,
            start_method=start_method,
        )
        was_cancelled = False
        try:
            while True:
                done = processes.join(timeout=0.2)
                _relay(messages, ctx)
                if done:
                    break
                if not was_cancelled:
                    try:
                        ctx.check_cancelled()
                    except JobCancelled:
                        was_cancelled = True
                        cancelled.set()
        except ProcessException as error:  # a rank raised, or died (e.g. out of memory)
            last_line = str(error).strip().splitlines()[-1]
            raise EngineError(f"data-parallel training failed: {last_line}") from error
        finally:
            for process in processes.processes:
                if process.is_alive():
                    process.terminate()
        if was_cancelled or not result_path.exists():
            raise JobCancelled()
        result = torch.load(result_path, weights_only=True)
    job.model.load_state_dict(result["state_dict"])
    set_training_mode(job.model, False)
    summary: dict[str, Any] = result["summary"]
    return summary


def _distributed_worker(
    rank: int, world_size: int, port: int, job: _Job, messages: Any, cancelled: _CancelFlag, result_path: str
) -> None:
    import torch.distributed as dist

    device = torch.device(job.device)
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
    )
    try:
        rank_job = _replace_job(job, device)
        summary = _train(rank_job, _QueueReporter(rank, messages, cancelled), rank=rank, world_size=world_size)
        if rank == 0:
            state = {k: v.detach().cpu() for k, v in job.model.state_dict().items()}
            torch.save({"state_dict": state, "summary": summary}, result_path)
    except JobCancelled:
        return
    finally:
        dist.destroy_process_group()


def _relay(messages: Any, ctx: StageContext) -> None:
    while True:
        try:
            message = messages.get_nowait()
        except queue_module.Empty:
            return
        if message[0] == "progress":
            ctx.progress(message[1], message[2])
        else:
            ctx.event(message[1], message[2])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _replace_job(job: _Job, device: torch.device) -> _Job:
    replaced = copy.copy(job)
    replaced.device = device
    return replaced


# ---------------------------------------------------------------- helpers


def _probe_forward(model: nn.Module, inputs: Batch) -> None:
    """One forward on a batch of the data, so a shape mismatch says so before training starts."""
    set_training_mode(model, False)  # so batch-norm statistics stay as they are
    try:
        with torch.no_grad():
            logits_of(call_model(model, inputs.to(module_device(model))))
    except EngineError:
        raise
    except Exception as error:
        described = (
            inputs.describe()
            if isinstance(inputs, ModelInputs)
            else f"inputs of shape {list(inputs.shape)}, dtype {inputs.dtype}"
        )
        raise EngineError(
            f"the model does not run on a batch of the dataset ({described}): {str(error).strip().splitlines()[-1]}"
        ) from error


def logits_of(output: Any) -> Tensor:
    """The logits of a forward: the tensor itself, or the first floating tensor of a tuple / dict
    (e.g. logits, aux; a Hugging Face model's output)."""
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return select_output(output)


def module_device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def _replace(config: TrainConfig, **changes: Any) -> TrainConfig:
    return dataclasses.replace(config, **changes)


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise EngineError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
