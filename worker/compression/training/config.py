"""Training options: the validated `TrainConfig` and the closed-form learning-rate schedule."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

import torch

from worker.compression.base import EngineError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("none", "step", "multistep", "exponential", "cosine", "plateau")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
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


def _replace(config: TrainConfig, **changes: Any) -> TrainConfig:
    return dataclasses.replace(config, **changes)


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise EngineError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
