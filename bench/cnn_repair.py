"""Benchmark: cross-layer equalization and bias correction for static_int8, with and without, measured on
inputs the calibration never saw: tests/zoo.py's tiny ResNet and MobileNetV3 (random init, batch norms given
statistics of their own, random images; SQNR against the float outputs) and the LeNet-style CNN trained on
digits (SQNR and top-1 on the test split). One thread, 4 calibration batches of 32.

    python -m bench.cnn_repair
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

CHOICES = (("off", "off"), ("on", "off"), ("off", "on"), ("on", "on"), ("auto", "auto"))


def measure_model(
    name: str, model: nn.Module, calibration: torch.Tensor, test: torch.Tensor, labels: torch.Tensor | None
) -> None:
    from worker.compression import metrics as measure
    from worker.compression.base import Dataset, StageContext
    from worker.compression.quantization import run_stage

    reference = measure.predict(model, test)
    for equalization, correction in CHOICES:
        ctx = StageContext(kind="eager", example_input=calibration[:4], train_data=Dataset(calibration))
        options = {"cross_layer_equalization": equalization, "bias_correction": correction, "calibration_batches": 4}
        result = run_stage(model, "static_int8", options, ctx)
        outputs = measure.predict(result.model, test)
        repair = result.info.get("repair", {})
        applied = [key for key in ("cross_layer_equalization", "bias_correction") if repair.get(key, {}).get("applied")]
        print(
            f"| {name} | {equalization} / {correction} | {measure.fidelity(reference, outputs)['sqnr_db']} dB | "
            f"{measure.accuracy(outputs, labels) or '-'} | {', '.join(applied) or 'none'} |",
            flush=True,
        )


def main() -> None:
    warnings.simplefilter("ignore")
    from tests import zoo
    from tests.helpers import SmallCNN, digits_split, train

    torch.set_num_threads(1)
    for name in ("resnet", "mobilenet_v3"):
        model = zoo.build(name).model
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.5, 0.5)
                    module.running_var.uniform_(0.5, 2.0)
        generator = torch.Generator().manual_seed(1)
        calibration, test = (
            torch.randn(192, 3, 32, 32, generator=generator),
            torch.randn(64, 3, 32, 32, generator=generator),
        )
        measure_model(name, model, calibration, test, None)
    x_train, x_test, y_train, y_test = digits_split()
    lenet = train(SmallCNN(), x_train, y_train, epochs=20).eval()
    measure_model("LeNet-style CNN (digits)", lenet, torch.tensor(x_train), torch.tensor(x_test), torch.tensor(y_test))


if __name__ == "__main__":
    main()
