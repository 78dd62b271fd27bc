"""Cross-layer equalization and bias correction for static int8, measured against the float model."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from tests import zoo
from tests.helpers import SmallCNN
from worker.compression import metrics as measure
from worker.compression.base import Dataset, StageContext
from worker.compression.quantization import full_range_qconfig, run_stage, sqnr_db
from worker.compression.quantization.repair import equalizable_pairs, fold_batch_norms, repair

OFF = {"cross_layer_equalization": "off", "bias_correction": "off"}


def weight_observer() -> Any:
    return full_range_qconfig().weight()


@pytest.mark.parametrize("name", ["resnet", "mobilenet_v3"])
def test_equalization_keeps_the_float_function_and_balances_the_pairs(name: str, one_thread: None) -> None:
    entry = zoo.build(name)
    model, images = entry.model, torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # batch norms with statistics of their own, so folding them changes the weights
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    repaired = repair(
        model, equalization=True, bias_correction=False, targets=[], make_observer=weight_observer, batches=[]
    )
    assert len(repaired.equalized_pairs) == 3  # ResNet: conv1 -> relu -> conv2 per block; MobileNet: SE fc1 -> fc2
    with torch.no_grad():
        assert torch.allclose(repaired.model(images), model(images), atol=1e-4, rtol=0)
    modules = dict(repaired.model.named_modules())
    for first, second in repaired.equalized_pairs:
        first_range = modules[first].weight.abs().flatten(1).amax(1)
        second_range = modules[second].weight.abs().transpose(0, 1).flatten(1).amax(1)
        assert torch.allclose(first_range, second_range, rtol=1e-3)


def unbalanced_cnn() -> nn.Module:
    """conv -> ReLU -> conv -> ReLU -> pool -> linear with four channels between the convs 50x the rest."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()
    with torch.no_grad():  # the same function in float: channel i scaled up, read back scaled down
        model[0].weight[:4] *= 50
        model[0].bias[:4] *= 50
        model[2].weight[:, :4] /= 50
    return model


def test_equalization_raises_static_int8_sqnr_on_unbalanced_channels(one_thread: None) -> None:
    model = unbalanced_cnn()
    generator = torch.Generator().manual_seed(1)
    calibration, test = torch.randn(128, 3, 8, 8, generator=generator), torch.randn(64, 3, 8, 8, generator=generator)
    assert equalizable_pairs(fold_batch_norms(model)) == [("0", "2")]
    ctx = StageContext(kind="eager", example_input=calibration[:4], train_data=Dataset(calibration))
    plain = run_stage(model, "static_int8", {**OFF, "calibration_batches": 4}, ctx).model
    equalized_options = {**OFF, "cross_layer_equalization": "on", "calibration_batches": 4}
    equalized = run_stage(model, "static_int8", equalized_options, ctx)
    with torch.no_grad():
        reference = model(test)
        plain_sqnr, equalized_sqnr = sqnr_db(reference, plain(test)), sqnr_db(reference, equalized.model(test))
    assert equalized_sqnr > plain_sqnr + 6
    assert equalized.info["repair"]["cross_layer_equalization"] == {
        "mode": "on",
        "applied": True,
        "pairs": [["0", "2"]],
    }


def mean_output_shift(reference: torch.Tensor, output: torch.Tensor) -> float:
    """The mean over output channels of |E[quantized - float]| over the samples."""
    return float((output - reference).mean(0).abs().mean())


def test_bias_correction_reduces_the_mean_output_shift(one_thread: None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    with torch.no_grad():  # one large weight per row makes each row's int8 step coarse, so rounding shifts the mean
        model[0].weight[:, 0] = 4.0
    generator = torch.Generator().manual_seed(2)
    calibration, test = torch.rand(256, 256, generator=generator), torch.rand(128, 256, generator=generator)
    ctx = StageContext(kind="eager", example_input=calibration[:4], train_data=Dataset(calibration))
    plain = run_stage(model, "static_int8", {**OFF, "calibration_batches": 8}, ctx).model
    corrected = run_stage(model, "static_int8", {**OFF, "bias_correction": "on", "calibration_batches": 8}, ctx)
    with torch.no_grad():
        reference = model(test)
        before, after = mean_output_shift(reference, plain(test)), mean_output_shift(reference, corrected.model(test))
    assert after < 0.5 * before
    report = corrected.info["repair"]["bias_correction"]
    assert report["applied"] and report["layers"] == 2


def test_auto_keeps_what_measures_better_on_held_out_samples(digits: Any, one_thread: None) -> None:
    from tests.helpers import train as fit

    train, _ = digits
    model = fit(SmallCNN(), train.inputs.numpy(), train.labels.numpy(), epochs=3).eval()
    ctx = StageContext(kind="eager", example_input=train.inputs[:4], train_data=train)
    result = run_stage(model, "static_int8", {"calibration_batches": 2}, ctx)
    report = result.info["repair"]
    assert report["held_out"] == "training samples after the calibration set" and report["held_out_samples"] == 64
    variants = {
        (v["cross_layer_equalization"], v["bias_correction"]): v["held_out_sqnr_db"] for v in report["variants"]
    }
    assert set(variants) == {(False, False), (False, True), (True, False), (True, True)}
    picked = (report["cross_layer_equalization"]["applied"], report["bias_correction"]["applied"])
    assert variants[picked] == max(variants.values()) or picked == (False, False)
    # the held-out figure of the delivered model, measured here on the same samples
    held_out = train.inputs[64:128]
    measured = measure.fidelity(measure.predict(model, held_out), measure.predict(result.model, held_out))["sqnr_db"]
    assert measured == pytest.approx(variants[picked], abs=0.01)
    assert report["effect_db"] == pytest.approx(variants[picked] - variants[(False, False)], abs=0.002)
