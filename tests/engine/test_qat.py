"""Quantization-aware training (qat_int8) on the digits CNN, judged on the loaded TorchScript artifact."""

from __future__ import annotations

import io

import pytest
import torch

from modelpress.catalog import JobFacts, SpecError, validate_stages
from tests.helpers import SmallCNN, accuracy, digits_split, train
from worker.compression.base import Dataset, StageContext
from worker.compression.quantization import count_quantized_ops, run_stage

STATIC = {"skip_layers": [], "keep_first_last_float": False, "calibration_batches": 16}


def artifact(model: torch.nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(model, example, check_trace=False), buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


def test_qat_int8_matches_float_and_beats_static_int8_on_digits() -> None:
    train_x, test_x, train_y, test_y = digits_split()
    model = train(SmallCNN(), train_x, train_y, epochs=20)
    example = torch.tensor(test_x[:4])
    ctx = StageContext("eager", example, train_data=Dataset(torch.tensor(train_x), torch.tensor(train_y)))
    float_top1 = accuracy(model, test_x, test_y)
    static = artifact(run_stage(model, "static_int8", STATIC, ctx).model, example)
    result = run_stage(model, "qat_int8", {**STATIC, "train": {"epochs": 3}}, ctx)
    qat = artifact(result.model, example)
    assert count_quantized_ops(qat) >= 4  # two convs and two linears run as int8 kernels
    static_top1, qat_top1 = accuracy(static, test_x, test_y), accuracy(qat, test_x, test_y)
    assert qat_top1 >= float_top1 - 0.003, (float_top1, static_top1, qat_top1)
    assert qat_top1 >= static_top1, (float_top1, static_top1, qat_top1)
    report = result.info["qat"]
    assert report["epochs_run"] == 3 and report["fine_tuned_parameters"] == 8
    assert result.info["quantized_layers"] == ["c1", "c2", "f1", "f2"]


def test_catalog_qat_needs_labelled_data_and_an_eager_model() -> None:
    with pytest.raises(SpecError, match="needs a dataset"):
        validate_stages([{"method": "quantize", "scheme": "qat_int8"}], JobFacts("state_dict"))
    with pytest.raises(SpecError, match="with labels"):
        validate_stages([{"method": "quantize", "scheme": "qat_int8"}], JobFacts("state_dict", has_dataset=True))
    # TorchScript uploads are converted to an exported program for graph-only stages, so they are accepted
    validate_stages(
        [{"method": "quantize", "scheme": "qat_int8"}],
        JobFacts("torchscript", has_dataset=True, dataset_has_labels=True),
    )
