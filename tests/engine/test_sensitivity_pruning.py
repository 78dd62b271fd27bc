"""analyze/sensitivity with `pruning: true`: per-layer whole-model fidelity with only that layer pruned."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from tests.helpers import SmallCNN
from tests.helpers import train as fit
from worker.compression import metrics as measure
from worker.compression import sensitivity
from worker.compression.base import StageContext
from worker.compression.sensitivity_pruning import PRUNING_AMOUNTS


def test_pruning_rows_per_layer_sorted_and_remeasured(digits: Any, one_thread: None) -> None:
    train, test = digits
    model = fit(SmallCNN(), train.inputs.numpy(), train.labels.numpy(), epochs=3).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = StageContext(kind="eager", example_input=train.inputs[:4], train_data=train, eval_data=test)
    info = sensitivity.run_stage(model, "sensitivity", {"pruning": True, "samples": 128}, ctx).info
    rows = info["pruning_sensitivity"]
    assert info["pruning_amounts"] == list(PRUNING_AMOUNTS)
    assert sorted(r["layer"] for r in rows) == ["c1", "c2", "f1", "f2"]
    assert all([r["amount"] for r in row["results"]] == list(PRUNING_AMOUNTS) for row in rows)
    # most harmful first at the largest amount: the larger top-1 drop, then the lower SQNR
    largest = [(-row["results"][-1]["accuracy_drop"], row["results"][-1]["sqnr_db"]) for row in rows]
    assert largest == sorted(largest)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # weights put back
    # every figure of the worst row, rebuilt with torch's own L1 pruning of that layer alone
    inputs, labels = test.inputs[:128], test.labels[:128]
    reference = measure.predict(model, inputs)
    for result in rows[0]["results"]:
        pruned = copy.deepcopy(model)
        layer = pruned.get_submodule(rows[0]["layer"])
        prune.l1_unstructured(layer, "weight", amount=result["amount"])
        outputs = measure.predict(pruned, inputs)
        assert measure.fidelity(reference, outputs)["sqnr_db"] == pytest.approx(result["sqnr_db"], abs=0.01)
        drop = measure.accuracy(reference, labels) - measure.accuracy(outputs, labels)  # type: ignore[operator]
        assert drop == pytest.approx(result["accuracy_drop"], abs=1e-6)
    # the report and the dashboard draw it: one bar per layer and amount
    from app.report import job_charts

    charts = {chart.name: chart for chart in job_charts({"pruning_sensitivity": rows}, [])}
    svg = charts["pruning-sensitivity"].svg
    assert all(f'id="prune-bar-{i}-{j}"' in svg for i in range(len(rows)) for j in range(len(PRUNING_AMOUNTS)))
    assert all(row["layer"] in svg for row in rows)
    # pruning more of a layer never helps its fidelity here
    assert all(
        row["results"][0]["sqnr_db"] >= row["results"][-1]["sqnr_db"] for row in rows if row["results"][0]["sqnr_db"]
    )


def test_pruning_table_is_left_out_unless_asked(one_thread: None) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    inputs = torch.randn(16, 8)
    ctx = StageContext(kind="eager", example_input=inputs[:4], train_data=None)
    info = sensitivity.run_stage(model, "sensitivity", {}, ctx).info
    assert "pruning_sensitivity" not in info and len(info["sensitivity"]) == 2
