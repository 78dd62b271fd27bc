"""Accuracy-aware search on scikit-learn's digits: the smallest candidate that meets the bar."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import accuracy, digits_split, mlp, train
from worker.compression.base import Dataset, StageContext
from worker.compression.search import linear_widths, run_stage


@pytest.fixture(scope="module")
def digits_mlp():  # type: ignore[no-untyped-def]
    x_train, x_test, y_train, y_test = digits_split()
    model = train(mlp((64, 128, 64, 10)), x_train, y_train, epochs=25)
    return model, (x_train, x_test, y_train, y_test)


def context(data, kind="eager") -> StageContext:  # type: ignore[no-untyped-def]
    x_train, x_test, y_train, y_test = data
    return StageContext(
        kind=kind,
        example_input=torch.tensor(x_test[:32]),
        train_data=Dataset(torch.tensor(x_train), torch.tensor(y_train)),
        eval_data=Dataset(torch.tensor(x_test), torch.tensor(y_test)),
    )


def test_search_returns_the_smallest_candidate_within_the_bar(digits_mlp) -> None:  # type: ignore[no-untyped-def]
    model, data = digits_mlp
    original = accuracy(model, data[1], data[3])
    result = run_stage(
        model,
        "accuracy_aware",
        {"max_accuracy_drop": 0.01, "objective": "size", "max_trials": 8, "train": {"epochs": 2}},
        context(data),
    )
    info = result.info
    assert info["result"] == "met"
    trials = [t for t in info["trials"] if t["status"] in ("met", "missed")]
    assert len(trials) >= 3
    met = [t for t in trials if t["status"] == "met"]
    assert info["chosen"]["size_bytes"] == min(t["size_bytes"] for t in met)
    assert info["chosen"]["size_bytes"] < info["original_size_bytes"]
    # independent: the returned model's accuracy on the same held-out data
    measured = accuracy(result.model, data[1], data[3])
    assert original - measured <= 0.01 + 1e-9
    assert abs(measured - info["chosen"]["accuracy"]) < 1e-6


def test_impossible_bar_returns_the_original_and_names_the_closest(digits_mlp) -> None:  # type: ignore[no-untyped-def]
    model, data = digits_mlp
    result = run_stage(
        model,
        "accuracy_aware",
        {
            "min_sqnr_db": 199.0,
            "max_trials": 3,
            "candidates": {
                "recipes": [
                    [{"method": "quantize", "scheme": "dynamic_int8"}],
                    [{"method": "prune", "scheme": "l1_unstructured", "amount": 0.5}],
                ]
            },
        },
        context(data),
    )
    assert result.info["result"] == "no_candidate_met_constraints"
    # int8 missed, so its mixed-precision fallback was tried too, and said why it could not meet the bar
    trials = result.info["trials"]
    assert [t["candidate"] for t in trials] == ["recipe 0", "recipe 1", "recipe 0 mixed precision"]
    assert trials[2]["status"] == "failed" and "no mix of float and int8 layers" in trials[2]["reason"]
    best_sqnr = max(t["sqnr_db"] for t in trials if t["sqnr_db"] is not None)
    assert result.info["closest"]["sqnr_db"] == best_sqnr
    assert result.info["chosen"]["candidate"].startswith("original")
    assert result.model is model


def test_linear_widths_reads_an_mlp_chain() -> None:
    assert linear_widths(mlp((64, 32, 10)), torch.zeros(2, 64)) == [64, 32, 10]
    assert linear_widths(torch.nn.Conv2d(1, 2, 3), torch.zeros(2, 1, 8, 8)) is None
