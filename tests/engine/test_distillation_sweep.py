"""Distillation never ships worse than its baseline: baseline + (temperature, alpha) sweep, best delivered."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import accuracy, digits_split, mlp, train
from worker.compression.base import Dataset, StageContext
from worker.compression.distillation import run_stage

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delivered_student_is_never_below_the_baseline(seed: int) -> None:
    x_train, x_test, y_train, y_test = digits_split()
    teacher = train(mlp(), x_train, y_train, epochs=40, seed=seed)  # trained longer than the student
    train_data = Dataset(torch.tensor(x_train), torch.tensor(y_train))
    eval_data = Dataset(torch.tensor(x_test), torch.tensor(y_test))
    ctx = StageContext(
        kind="eager", example_input=train_data.inputs[:8], train_data=train_data, eval_data=eval_data, seed=seed
    )
    result = run_stage(teacher, "hinton", {"student": "auto", "width_multiplier": 0.1, "train": {"epochs": 20}}, ctx)
    info = result.info
    runs = {run["run"]: run for run in info["runs"]}
    assert "baseline" in runs and len(runs) >= 3  # the baseline and at least two distilled settings
    delivered = accuracy(result.model, x_test, y_test)  # measured here, on the delivered module
    assert delivered == pytest.approx(info["student_accuracy"], abs=1e-6)
    assert delivered == pytest.approx(runs[info["delivered"]]["accuracy"], abs=1e-6)
    assert runs["baseline"]["accuracy"] == pytest.approx(info["baseline_accuracy"], abs=1e-6)
    assert delivered >= runs["baseline"]["accuracy"] - 1e-6  # float32 top-1 vs the engine's float64
    assert delivered == pytest.approx(max(run["accuracy"] for run in runs.values()), abs=1e-6)
    lost = all(run["accuracy"] <= runs["baseline"]["accuracy"] for name, run in runs.items() if name != "baseline")
    assert lost == any("did not beat the baseline" in w for w in info["warnings"])
