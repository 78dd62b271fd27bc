"""Benchmark: cross-layer equalization and bias correction for static_int8, with and without, measured on
inputs the calibration never saw: tests/zoo.py's tiny ResNet and MobileNetV3 (random init, batch norms given
statistics of their own, random images; SQNR against the float outputs) and the LeNet-style CNN trained on
digits (SQNR and top-1 on the test split). One thread, 4 calibration batches of 32.

    python -m bench.cnn_repair           # print the rows
    python -m bench.cnn_repair --record  # and write them into BENCHMARKS.md
"""

from __future__ import annotations

import sys
import time
import warnings
from typing import Any

import torch
from torch import nn

CHOICES = (("off", "off"), ("on", "off"), ("off", "on"), ("on", "on"), ("auto", "auto"))


def measure_model(
    name: str, model: nn.Module, calibration: torch.Tensor, test: torch.Tensor, labels: torch.Tensor | None
) -> list[list[Any]]:
    from worker.compression import metrics as measure
    from worker.compression.base import Dataset, StageContext
    from worker.compression.quantization import run_stage

    reference = measure.predict(model, test)
    rows = []
    for equalization, correction in CHOICES:
        ctx = StageContext(kind="eager", example_input=calibration[:4], train_data=Dataset(calibration))
        options = {"cross_layer_equalization": equalization, "bias_correction": correction, "calibration_batches": 4}
        result = run_stage(model, "static_int8", options, ctx)
        outputs = measure.predict(result.model, test)
        repair = result.info.get("repair", {})
        applied = [key for key in ("cross_layer_equalization", "bias_correction") if repair.get(key, {}).get("applied")]
        effect = repair.get("effect_db")
        rows.append(
            [
                name,
                f"{equalization} / {correction}",
                measure.fidelity(reference, outputs)["sqnr_db"],
                measure.accuracy(outputs, labels) if labels is not None else "-",
                ", ".join(applied) or "none",
                "-" if effect is None else f"{effect:+.3f} dB",
            ]
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    warnings.simplefilter("ignore")
    from bench import model_zoo as zoo
    from bench.common import record_section
    from bench.fixtures import SmallCNN, digits_split, train
    from worker.compression import metrics as measure

    torch.set_num_threads(1)
    started = time.perf_counter()
    rows = []
    for name in ("resnet", "mobilenet_v3"):
        model = zoo.build(name).model
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    assert module.running_mean is not None and module.running_var is not None
                    module.running_mean.uniform_(-0.5, 0.5)
                    module.running_var.uniform_(0.5, 2.0)
        generator = torch.Generator().manual_seed(1)
        calibration, test = (
            torch.randn(192, 3, 32, 32, generator=generator),
            torch.randn(64, 3, 32, 32, generator=generator),
        )
        rows += measure_model(name, model, calibration, test, None)
    x_train, x_test, y_train, y_test = digits_split()
    lenet = train(SmallCNN(), x_train, y_train, epochs=20).eval()
    float_top1 = measure.accuracy(measure.predict(lenet, torch.tensor(x_test)), torch.tensor(y_test))
    rows += measure_model(
        "LeNet-style CNN (digits)", lenet, torch.tensor(x_train), torch.tensor(x_test), torch.tensor(y_test)
    )
    if "--record" in sys.argv:
        record_section(
            "cnn_repair",
            {
                "title": "8. CNN repair for static int8: cross-layer equalization and bias correction",
                "command": "python -m bench.cnn_repair --record",
                "intro": __doc__.split("\n\n")[0].replace("\n", " ") if __doc__ else "",
                "size": "full",
                "seconds": round(time.perf_counter() - started, 1),
                "tables": [
                    {
                        "title": "static_int8 with each repair off / on, and auto (the default)",
                        "columns": [
                            "model",
                            "CLE / bias correction",
                            "SQNR (test)",
                            "top-1 (test)",
                            "applied",
                            "auto: held-out effect",
                        ],
                        "rows": rows,
                    }
                ],
                "notes": [f"LeNet-style CNN float top-1 on the test split: {float_top1}."],
            },
        )


if __name__ == "__main__":
    main()
