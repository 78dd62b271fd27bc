"""The training loop: optimizers, schedules, regularization, early stopping, cancellation, DDP."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from worker.compression.base import Dataset, EngineError, JobCancelled, StageContext
from worker.compression.training import TrainConfig, evaluate_accuracy, fit, learning_rate, set_training_mode

pytestmark = pytest.mark.usefixtures("one_thread")


def small_mlp(seed: int = 0, hidden: int = 32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def tiny_data(n: int = 40) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    return Dataset(torch.randn(n, 64, generator=generator), torch.randint(0, 10, (n,), generator=generator))


def constant_loss(model: nn.Module, inputs: Tensor, targets: Tensor | None) -> Tensor:
    # A loss that never improves: plateau and early stopping must react to it.
    return model(inputs).sum() * 0.0 + 1.0


class Recorder:
    def __init__(self, cancel_after_checks: int | None = None) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.progress: list[float] = []
        self.checks = 0
        self.cancel_after_checks = cancel_after_checks

    def context(self, example: Tensor, seed: int = 0) -> StageContext:
        return StageContext(
            kind="eager",
            example_input=example,
            seed=seed,
            progress=lambda fraction, message: self.progress.append(fraction),
            event=lambda kind, data: self.events.append((kind, data)),
            check_cancelled=self.check,
        )

    def check(self) -> None:
        self.checks += 1
        if self.cancel_after_checks is not None and self.checks > self.cancel_after_checks:
            raise JobCancelled()

    def epochs(self) -> list[dict[str, Any]]:
        return [data for kind, data in self.events if kind == "epoch"]


def ctx_for(data: Dataset, seed: int = 0) -> StageContext:
    return StageContext(kind="eager", example_input=data.inputs[:1], seed=seed)


@pytest.mark.parametrize(
    "options",
    [
        {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True},
        {"optimizer": "sgd", "lr": 0.5, "momentum": 0.0},
        {"optimizer": "adam", "lr": 3e-3},
        {"optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.01, "label_smoothing": 0.1, "grad_clip": 1.0},
    ],
)
def test_each_optimizer_learns_digits(digits: tuple[Dataset, Dataset], options: dict[str, Any]) -> None:
    train, test = digits
    model = small_mlp()
    before = evaluate_accuracy(model, test)
    summary = fit(model, train, {**options, "epochs": 3}, ctx_for(train))
    assert summary["epochs_run"] == 3
    assert summary["loss_history"][-1] < summary["loss_history"][0]
    assert evaluate_accuracy(model, test) > max(0.8, before + 0.5)


def lr_history(options: dict[str, Any], loss_fn: Any = None) -> list[float]:
    data = tiny_data(40)  # batch 10 -> 4 steps per epoch
    summary = fit(
        small_mlp(hidden=4), data, {"batch_size": 10, "optimizer": "sgd", **options}, ctx_for(data), loss_fn=loss_fn
    )
    history: list[float] = summary["lr_history"]
    return history


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"lr": 0.1, "epochs": 6, "schedule": "none"}, [0.1] * 6),
        (
            {"lr": 0.1, "epochs": 6, "schedule": "step", "step_size": 2, "gamma": 0.5},
            [0.1, 0.1, 0.05, 0.05, 0.025, 0.025],
        ),
        (
            {"lr": 0.1, "epochs": 6, "schedule": "multistep", "milestones": [1, 4], "gamma": 0.1},
            [0.1, 0.01, 0.01, 0.01, 0.001, 0.001],
        ),
        ({"lr": 0.1, "epochs": 5, "schedule": "exponential", "gamma": 0.5}, [0.1 * 0.5**e for e in range(5)]),
        (
            {"lr": 0.1, "epochs": 4, "schedule": "cosine", "min_lr": 0.01},
            [0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)],
        ),
        (
            {"lr": 0.1, "epochs": 4, "schedule": {"name": "step", "step_size": 1, "gamma": 0.5}},
            [0.1, 0.05, 0.025, 0.0125],
        ),
    ],
)
def test_schedule_follows_formula(options: dict[str, Any], expected: list[float]) -> None:
    assert lr_history(options) == pytest.approx(expected, rel=1e-9)


def test_plateau_reduces_after_patience() -> None:
    history = lr_history(
        {"lr": 0.1, "epochs": 6, "schedule": "plateau", "plateau_patience": 1, "gamma": 0.5}, loss_fn=constant_loss
    )
    assert history == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.025])


def test_warmup_is_linear_per_step_then_schedule() -> None:
    config = TrainConfig.from_options(
        {"lr": 0.2, "epochs": 6, "warmup_epochs": 2, "schedule": "step", "step_size": 2, "gamma": 0.5}
    )
    per_step = [learning_rate(config, step, 4) for step in range(24)]
    assert per_step[:8] == pytest.approx([0.2 * (s + 1) / 8 for s in range(8)])
    assert per_step[8:16] == pytest.approx([0.2] * 8)
    assert per_step[16:24] == pytest.approx([0.1] * 8)
    # the loop uses the same function: first step of each epoch
    history = lr_history({"lr": 0.2, "epochs": 6, "warmup_epochs": 2, "schedule": "step", "step_size": 2, "gamma": 0.5})
    assert history == pytest.approx([0.2 / 8, 0.2 * 5 / 8, 0.2, 0.2, 0.1, 0.1])


def test_cosine_per_step_reaches_min_lr() -> None:
    config = TrainConfig.from_options({"lr": 1.0, "epochs": 3, "schedule": "cosine", "min_lr": 0.1})
    assert learning_rate(config, 0, 10) == pytest.approx(1.0)
    assert learning_rate(config, 15, 10) == pytest.approx(0.55)
    assert learning_rate(config, 30, 10) == pytest.approx(0.1)


def test_early_stopping_stops_and_reports() -> None:
    data = tiny_data(60)
    recorder = Recorder()
    summary = fit(
        small_mlp(hidden=4),
        data,
        {"epochs": 30, "early_stopping_patience": 2, "val_split": 0.25},
        recorder.context(data.inputs[:1]),
        loss_fn=constant_loss,
    )
    assert summary["stopped_early"] is True
    assert summary["epochs_run"] == 3
    assert summary["val_samples"] == 15 and summary["train_samples"] == 45
    assert summary["best_epoch"] == 1
    events = recorder.epochs()
    assert [e["epoch"] for e in events] == [1, 2, 3]
    assert set(events[0]) >= {"epoch", "loss", "val_accuracy", "lr"}
    assert recorder.progress[-1] == 1.0


def test_early_stopping_restores_best_weights(digits: tuple[Dataset, Dataset]) -> None:
    train, _ = digits
    model = small_mlp()
    summary = fit(
        model,
        train,
        {"epochs": 6, "lr": 0.5, "optimizer": "sgd", "early_stopping_patience": 2, "val_split": 0.2},
        ctx_for(train),
    )
    assert summary["restored_best"] is True
    assert summary["best_val_accuracy"] == max(summary["val_accuracy_history"])


def test_l1_penalty_shrinks_weights(digits: tuple[Dataset, Dataset]) -> None:
    train, _ = digits
    plain, sparse = small_mlp(), small_mlp()
    fit(plain, train, {"epochs": 3, "lr": 3e-3}, ctx_for(train))
    fit(sparse, train, {"epochs": 3, "lr": 3e-3, "l1": 1e-3}, ctx_for(train))
    plain_l1 = sum(float(p.detach().abs().sum()) for p in plain.parameters() if p.dim() >= 2)
    sparse_l1 = sum(float(p.detach().abs().sum()) for p in sparse.parameters() if p.dim() >= 2)
    assert sparse_l1 < 0.8 * plain_l1


def test_same_seed_same_weights_other_seed_differs() -> None:
    data = tiny_data(80)
    models = [small_mlp(hidden=8) for _ in range(3)]
    for model, seed in zip(models, (7, 7, 8)):
        fit(model, data, {"epochs": 2, "batch_size": 16, "seed": seed, "val_split": 0.2}, ctx_for(data))
    same = [torch.equal(a, b) for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values())]
    assert all(same)
    assert not torch.equal(models[0].state_dict()["0.weight"], models[2].state_dict()["0.weight"])


def test_seed_defaults_to_context_seed() -> None:
    data = tiny_data(80)
    first, second = small_mlp(hidden=8), small_mlp(hidden=8)
    fit(first, data, {"epochs": 1, "batch_size": 16}, ctx_for(data, seed=3))
    fit(second, data, {"epochs": 1, "batch_size": 16, "seed": 3}, ctx_for(data, seed=99))
    assert torch.equal(first.state_dict()["0.weight"], second.state_dict()["0.weight"])


def test_cancellation_between_epochs() -> None:
    data = tiny_data(40)
    recorder = Recorder(cancel_after_checks=1)  # the check before epoch 2 raises
    with pytest.raises(JobCancelled):
        fit(small_mlp(hidden=4), data, {"epochs": 10, "batch_size": 10}, recorder.context(data.inputs[:1]))
    assert len(recorder.epochs()) == 1


def test_cancellation_within_an_epoch() -> None:
    data = tiny_data(200)  # 200 batches of one sample: the loop checks every 20
    recorder = Recorder(cancel_after_checks=2)
    steps: list[int] = []
    with pytest.raises(JobCancelled):
        fit(
            small_mlp(hidden=4),
            data,
            {"epochs": 5, "batch_size": 1},
            recorder.context(data.inputs[:1]),
            after_step=lambda: steps.append(1),
        )
    assert len(steps) == 40
    assert recorder.epochs() == []


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"optimizer": "lion"}, "train.optimizer"),
        ({"schedule": "triangular"}, "train.schedule"),
        ({"lr": -0.1}, "train.lr"),
        ({"lr": "fast"}, "train.lr"),
        ({"epochs": 0}, "train.epochs"),
        ({"batch_size": 2.5}, "train.batch_size"),
        ({"schedule": "multistep"}, "milestones"),
        ({"milestones": [3, -1], "schedule": "multistep"}, "milestones"),
        ({"val_split": 1.5}, "train.val_split"),
        ({"label_smoothing": 1.0}, "train.label_smoothing"),
        ({"amp": "int8"}, "train.amp"),
        ({"optimizer": "adam", "nesterov": True}, "nesterov"),
        ({"warmup_epochs": 5, "epochs": 5}, "warmup_epochs"),
        ({"devices": 0}, "train.devices"),
        ({"learning_rate": 0.1}, "unknown train option"),
        ({"schedule": {"step_size": 3}}, "name"),
    ],
)
def test_bad_options_raise_engine_error(options: dict[str, Any], words: str) -> None:
    data = tiny_data(20)
    with pytest.raises(EngineError, match=words):
        fit(small_mlp(hidden=4), data, options, ctx_for(data))


def test_shape_mismatch_and_missing_labels_raise_engine_error() -> None:
    data = tiny_data(20)
    with pytest.raises(EngineError, match="does not run on a batch"):
        fit(small_mlp(hidden=4), Dataset(torch.randn(20, 65), data.labels), {"epochs": 1}, ctx_for(data))
    with pytest.raises(EngineError, match="labels"):
        fit(small_mlp(hidden=4), Dataset(data.inputs), {"epochs": 1}, ctx_for(data))


def test_amp_on_cpu_is_ignored_with_a_log_line() -> None:
    data = tiny_data(20)
    recorder = Recorder()
    summary = fit(small_mlp(hidden=4), data, {"epochs": 1, "amp": "bf16"}, recorder.context(data.inputs[:1]))
    assert summary["amp"] is None
    assert any(kind == "log" and "CUDA" in data_["message"] for kind, data_ in recorder.events)


def test_exported_graph_module_trains(digits: tuple[Dataset, Dataset]) -> None:
    train, test = digits
    eager = small_mlp()
    batch = torch.export.Dim("batch")
    graph = torch.export.export(eager, (train.inputs[:4],), dynamic_shapes=({0: batch},)).module()
    before = evaluate_accuracy(graph, test)
    initial = copy.deepcopy(graph.state_dict())
    summary = fit(graph, train, {"epochs": 3, "lr": 3e-3, "val_split": 0.1}, ctx_for(train))
    assert summary["epochs_run"] == 3
    assert any(not torch.equal(initial[k], v) for k, v in graph.state_dict().items())
    assert evaluate_accuracy(graph, test) > max(0.8, before + 0.5)


def test_custom_loss_and_targets_reach_loss_fn() -> None:
    data = tiny_data(30)
    soft = torch.softmax(torch.randn(30, 10, generator=torch.Generator().manual_seed(1)), dim=1)
    seen: list[Tensor] = []

    def soft_loss(model: nn.Module, inputs: Tensor, targets: Tensor | None) -> Tensor:
        assert targets is not None
        seen.append(targets)
        return -(targets * torch.log_softmax(model(inputs), dim=1)).sum(dim=1).mean()

    fit(
        small_mlp(hidden=4),
        Dataset(data.inputs),
        {"epochs": 1, "batch_size": 30, "shuffle": False},
        ctx_for(data),
        loss_fn=soft_loss,
        targets=soft,
    )
    assert torch.equal(seen[0], soft)


def test_data_parallel_two_cpu_processes_matches_one(digits: tuple[Dataset, Dataset]) -> None:
    train, test = digits
    single, parallel = small_mlp(), small_mlp()
    options = {"epochs": 4, "lr": 3e-3, "batch_size": 32}
    fit(single, train, options, ctx_for(train))
    recorder = Recorder()
    summary = fit(parallel, train, {**options, "devices": 2, "val_split": 0.1}, recorder.context(train.inputs[:1]))
    assert summary["devices"] == 2
    assert [e["epoch"] for e in recorder.epochs()] == [1, 2, 3, 4]
    assert recorder.progress[-1] == 1.0
    single_accuracy, parallel_accuracy = evaluate_accuracy(single, test), evaluate_accuracy(parallel, test)
    assert parallel_accuracy > 0.85
    assert abs(parallel_accuracy - single_accuracy) < 0.05


def test_data_parallel_cancellation() -> None:
    data = tiny_data(400)
    recorder = Recorder(cancel_after_checks=0)
    model = small_mlp(hidden=4)
    initial = copy.deepcopy(model.state_dict())
    with pytest.raises(JobCancelled):
        fit(model, data, {"epochs": 200, "batch_size": 1, "devices": 2}, recorder.context(data.inputs[:1]))
    assert len(recorder.epochs()) < 200
    assert all(torch.equal(initial[k], v) for k, v in model.state_dict().items())


def test_exported_graph_with_dropout_switches_modes() -> None:
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.Linear(16, 3)).train()
    batch = torch.export.Dim("batch")
    graph = torch.export.export(eager, (torch.randn(4, 8),), dynamic_shapes=({0: batch},)).module()
    probe = torch.randn(6, 8)
    set_training_mode(graph, True)
    assert not torch.equal(graph(probe), graph(probe))  # dropout active while training
    data = Dataset(torch.randn(40, 8), torch.randint(0, 3, (40,)))
    summary = fit(graph, data, {"epochs": 2, "val_split": 0.25}, ctx_for(data))
    assert summary["epochs_run"] == 2
    assert torch.equal(graph(probe), graph(probe))  # left in eval mode: deterministic


def test_data_parallel_rank_failure_is_an_engine_error() -> None:
    data = tiny_data(40)

    def broken_step() -> None:
        raise RuntimeError("mask shape mismatch")

    with pytest.raises(EngineError, match="data-parallel training failed: .*mask shape mismatch"):
        fit(
            small_mlp(hidden=4),
            data,
            {"epochs": 1, "batch_size": 10, "devices": 2},
            ctx_for(data),
            after_step=broken_step,
        )
