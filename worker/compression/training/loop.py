"""The epoch loop that `fit` and every data-parallel rank run: optimizer steps, schedule, validation, early stop."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from worker.compression.base import Dataset, EngineError, JobCancelled, StageContext
from worker.compression.inputs import Batch
from worker.compression.training.config import (
    _DEFAULT_GAMMA,
    _PLATEAU_THRESHOLD,
    AMP_DTYPES,
    TrainConfig,
    learning_rate,
)
from worker.compression.training.evaluation import evaluate_accuracy, module_device, set_training_mode

LossFn = Callable[[nn.Module, Batch, Tensor | None], Tensor]

# Cancellation (and, data-parallel, the agreement on it) every this many batches.
CANCEL_CHECK_BATCHES = 20


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
