"""Quantization-aware training (scheme `qat_int8`): fake-quantized fine-tuning, then the static int8 artifact.

The training runs on torchao's PT2E QAT: the model is exported, `prepare_qat_pt2e`
with the X86 inductor quantizer (is_qat=True) inserts fake-quantize nodes for the
weights (int8, per output channel, symmetric) and the activations (uint8, per
tensor), and the job's `train` options drive the one training loop of
`worker.compression.training.fit` through them, so the weights learn to sit well
on the int8 grid.

The artifact is the same as `static_int8` makes (torch.ao FX convert, traced to
TorchScript with fbgemm/onednn int8 kernels): PT2E's own `convert_pt2e` leaves
q/dq pairs around float kernels, no faster without torch.compile, and its .pt2
keeps the float weights too (see `worker.compression.quantization`). So the
fine-tuned float weights are copied back into the model and converted by the
static path, which calibrates activation ranges on the dataset. The weight grid
is the one QAT trained on (per-channel symmetric int8 from min/max of the same
weights); the activation ranges are recalibrated rather than taken from the fake
quantizers, as the two libraries' observers do not share a format.
"""

from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from worker.compression.base import EngineError, StageContext

if TYPE_CHECKING:
    from worker.compression.quantization.plan import _Done

# A short, gentle fine-tune: the model is already trained, QAT only nudges weights onto the grid.
QAT_TRAIN_DEFAULTS: dict[str, Any] = {"epochs": 3, "lr": 1e-4, "optimizer": "adamw"}


def quantization_aware_training(model: nn.Module, options: dict[str, Any], ctx: StageContext) -> _Done:
    """Fine-tune `model` with int8 fake quantization, then convert it as static int8 does.

    Args:
        model: an eager module or an exported program's `.module()` (lifted to torch-level modules).
        options: the stage options: `train` (epochs default 3, lr 1e-4), skip_layers,
            keep_first_last_float, calibration_batches.
        ctx: training data with labels (also the calibration data), optional eval data, device.

    Returns:
        The static int8 result of the fine-tuned weights; info adds the training summary and
        which parameters were fine-tuned.

    Example:
        >>> done = quantization_aware_training(model, {"train": {"epochs": 3}}, ctx)
    """
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    from worker.compression.quantization import torch_level_module
    from worker.compression.quantization.static import _static_int8_fx
    from worker.compression.training import fit

    if ctx.train_data is None or ctx.train_data.labels is None:
        raise EngineError("qat_int8 fine-tunes on labels: give the job a dataset_id with labels")
    if ctx.kind == "torchscript":
        raise EngineError("qat_int8 needs an eager model or an exported program, not TorchScript")
    float_model = torch_level_module(model) if ctx.kind == "graph" else copy.deepcopy(model).eval()
    started = time.perf_counter()
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    assert isinstance(ctx.example_input, torch.Tensor)  # QAT exports one input tensor with a dynamic batch
    example = ctx.example_input[:1].expand(2, *ctx.example_input.shape[1:]).contiguous()
    try:
        exported = torch.export.export(float_model, (example,), dynamic_shapes=({0: batch},)).module()
    except Exception as error:
        raise EngineError(f"qat_int8 could not export the model with torch.export ({error})") from error
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_qat=True))
    prepared = prepare_qat_pt2e(exported, quantizer)
    ctx.progress(0.05, "qat_int8: fake-quantized fine-tuning")
    summary = fit(
        prepared, ctx.train_data, options.get("train"), ctx, val_data=ctx.eval_data, defaults=QAT_TRAIN_DEFAULTS
    )
    copied = _copy_trained_weights(prepared, float_model)
    # no cross-layer equalization or bias correction: the weights were fine-tuned on the int8 grid they have
    converted_options = {**options, "cross_layer_equalization": "off", "bias_correction": "off"}
    done = _static_int8_fx(float_model.eval(), converted_options, ctx)
    done.info.update(
        {
            "qat": {
                "library": "torchao.quantization.pt2e prepare_qat_pt2e (X86InductorQuantizer, is_qat=True)",
                "fine_tuned_parameters": copied,
                "epochs_run": summary["epochs_run"],
                "final_loss": summary["final_loss"],
                "loss_history": summary["loss_history"],
                "val_accuracy_history": summary["val_accuracy_history"],
                "seconds": round(time.perf_counter() - started, 2),
            }
        }
    )
    return done


def _copy_trained_weights(prepared: nn.Module, float_model: nn.Module) -> int:
    """Copy the fine-tuned parameters (and batch-norm statistics) of the QAT graph into `float_model`, by name.

    torch.export keeps the original fully qualified names; every float parameter must be found, or the
    artifact would silently mix trained and untrained weights.
    """
    trained = prepared.state_dict()
    target = float_model.state_dict()
    missing = [name for name, value in target.items() if value.is_floating_point() and name not in trained]
    if missing:
        raise EngineError(f"qat_int8: the fine-tuned graph lost the parameters {missing[:5]}; cannot convert it")
    with torch.no_grad():
        for name, value in target.items():
            if name in trained and trained[name].shape == value.shape:
                value.copy_(trained[name])
    return sum(1 for name, value in target.items() if value.is_floating_point())
