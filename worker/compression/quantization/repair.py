"""CNN repair for static int8: cross-layer equalization and bias correction (Nagel et al. 2019).

Both run on the float model after batch norms are folded into the convolutions before them, and
before the model is calibrated and converted:

- Cross-layer equalization: for two consecutive layers joined only through ops that commute with a
  positive per-channel scale (ReLU, max / average pooling, dropout), output channel i of the first
  is divided by s_i and input channel i of the second multiplied by s_i, with
  s_i = sqrt(r1_i / r2_i) so both ranges become sqrt(r1_i * r2_i). The float function is unchanged;
  the activations between the two layers lose their outlier channels, which a per-tensor activation
  scale otherwise has to cover.
- Bias correction: quantizing a weight shifts the layer's expected output by E[(W_q - W) x]. That
  shift is measured per output channel on the calibration inputs of the layer (with the same weight
  observer the backend converts with, so W_q is the backend's) and subtracted from the bias.

AIMET and NNCF implement both; neither installs here and torchao has no CLE, so this is ModelPress's
own, on torch.fx. With mode "auto" (the default) the quantize stage measures each choice on held-out
calibration data and keeps a repair only when it raises the whole model's SQNR there
(`worker.compression.quantization.static`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from worker.compression import metrics as measure
from worker.compression.base import EngineError, StageContext
from worker.compression.inputs import Batch, call_model

REPAIR_OPTIONS = ("cross_layer_equalization", "bias_correction")
REPAIR_MODES = ("auto", "on", "off")
# "auto" keeps a repair only when it raises the held-out SQNR by more than this (noise of one calibration).
AUTO_MARGIN_DB = 0.1
# Held-out samples for "auto": this many batches of 32 past the calibration set.
HELD_OUT_BATCHES = 2
CLE_ITERATIONS = 20
# Channels whose weights are all (nearly) zero are left alone: their scale would be undefined.
_DEAD_RANGE = 1e-8

_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Ops f with f(s * x) = s * f(x) per channel for s > 0: a scale can pass through them.
_SCALE_EQUIVARIANT_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.Dropout,
    nn.Identity,
)
_SCALE_EQUIVARIANT_FUNCTIONS: set[Any] = {
    F.relu,
    torch.relu,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.dropout,
}
_SCALE_EQUIVARIANT_METHODS = {"relu"}


@dataclass
class Repaired:
    """The repaired float model and what was done to it."""

    model: nn.Module
    equalized_pairs: list[tuple[str, str]] = field(default_factory=list)
    corrected_layers: int = 0
    # mean over corrected layers of the mean |shift| per output channel that was removed
    mean_abs_shift_removed: float | None = None


def fold_batch_norms(model: nn.Module) -> fx.GraphModule:
    """A traced copy of `model` with every Conv -> BatchNorm (and Linear -> BatchNorm1d) folded; names kept."""
    from torch.fx.experimental.optimization import fuse

    try:
        traced = fx.symbolic_trace(model)
    except Exception as error:  # data-dependent control flow
        raise EngineError(f"cross-layer equalization / bias correction could not trace the model ({error})") from error
    folded = fuse(traced)  # copies; a BN is folded only when it is the conv's sole reader
    assert isinstance(folded, fx.GraphModule)
    return folded


def equalizable_pairs(model: fx.GraphModule) -> list[tuple[str, str]]:
    """(first, second) layer names joined only through scale-equivariant ops, each output read once."""
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in model.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in model.graph.nodes:
        first = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(first, _LAYER_TYPES) or calls[node.target] != 1:
            continue
        current = node
        while len(current.users) == 1:
            (reader,) = current.users
            if reader.args[:1] != (current,):
                break
            target = modules.get(reader.target) if reader.op == "call_module" else None
            if isinstance(target, _LAYER_TYPES):
                if calls[reader.target] == 1 and _channels_match(first, target):
                    pairs.append((str(node.target), str(reader.target)))
                break
            if not _scale_equivariant(reader, target):
                break
            current = reader
    return pairs


def _scale_equivariant(node: fx.Node, module: nn.Module | None) -> bool:
    if node.op == "call_module":
        return isinstance(module, _SCALE_EQUIVARIANT_MODULES)
    if node.op == "call_function":
        return node.target in _SCALE_EQUIVARIANT_FUNCTIONS
    return node.op == "call_method" and node.target in _SCALE_EQUIVARIANT_METHODS


def _channels_match(first: nn.Module, second: nn.Module) -> bool:
    if isinstance(first, nn.Linear) != isinstance(second, nn.Linear):
        return False  # a conv's channels reach a Linear through a flatten that mixes in positions
    channels = first.out_features if isinstance(first, nn.Linear) else first.out_channels
    if isinstance(second, nn.Linear):
        return bool(second.in_features == channels)
    assert isinstance(second, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    depthwise = second.groups == second.in_channels == second.out_channels
    return bool(second.in_channels == channels and (second.groups == 1 or depthwise))


def _input_channel_range(layer: nn.Module) -> torch.Tensor:
    weight = layer.get_parameter("weight").detach()
    if isinstance(layer, nn.Linear) or getattr(layer, "groups", 1) == 1:
        return weight.abs().transpose(0, 1).flatten(1).amax(1)
    return weight.abs().flatten(1).amax(1)  # depthwise: input channel i is weight[i]


def equalize(model: nn.Module, pairs: Sequence[tuple[str, str]]) -> None:
    """Cross-layer equalization of `pairs` in place; repeated so chains of pairs settle."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for _ in range(CLE_ITERATIONS):
            largest_change = 0.0
            for first_name, second_name in pairs:
                first, second = modules[first_name], modules[second_name]
                first_range = first.weight.abs().flatten(1).amax(1)
                second_range = _input_channel_range(second)
                alive = (first_range > _DEAD_RANGE) & (second_range > _DEAD_RANGE)
                scale = torch.where(alive, (first_range / second_range.clamp_min(_DEAD_RANGE)).sqrt(), 1.0)
                shape = (-1,) + (1,) * (first.weight.dim() - 1)
                first.weight.div_(scale.view(shape))
                if first.bias is not None:
                    first.bias.div_(scale)
                if isinstance(second, nn.Linear) or getattr(second, "groups", 1) == 1:
                    second.weight.mul_(scale.view((1, -1) + (1,) * (second.weight.dim() - 2)))
                else:
                    second.weight.mul_(scale.view(shape))
                largest_change = max(largest_change, float((scale.log().abs()).max()))
            if largest_change < 1e-3:
                return


def fake_quantized_weight(weight: torch.Tensor, make_observer: Callable[[], Any]) -> torch.Tensor:
    """The weight as the backend will store it: observed and rounded with the qconfig's own weight observer."""
    observer = make_observer()
    observer(weight)
    scale, zero_point = observer.calculate_qparams()
    low, high = observer.quant_min, observer.quant_max
    if observer.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine):
        return torch.fake_quantize_per_channel_affine(
            weight, scale.float(), zero_point.int(), observer.ch_axis, low, high
        )
    return torch.fake_quantize_per_tensor_affine(weight, float(scale), int(zero_point), low, high)


def correct_biases(
    model: nn.Module, targets: Sequence[str], make_observer: Callable[[], Any], batches: Sequence[Batch]
) -> tuple[int, float]:
    """Subtract from each target layer's bias the mean output shift its quantized weight causes, in place.

    The shift of each layer is measured on that layer's own inputs in the float model over `batches`.
    Returns (layers corrected, mean |shift| removed, averaged over channels and layers).
    """
    modules = dict(model.named_modules())
    layers = {name: modules[name] for name in targets if isinstance(modules.get(name), _LAYER_TYPES)}
    errors = {
        name: fake_quantized_weight(layer.weight.detach(), make_observer) - layer.weight
        for name, layer in layers.items()
    }
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def record(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(layer: nn.Module, args: tuple[Any, ...]) -> None:
            shift = _layer_output(layer, args[0], errors[name])
            channel_axis = shift.dim() - 1 if isinstance(layer, nn.Linear) else 1
            moved = shift.movedim(channel_axis, -1).reshape(-1, shift.shape[channel_axis])
            sums[name] = sums.get(name, 0) + moved.sum(0)
            counts[name] = counts.get(name, 0) + moved.shape[0]

        return hook

    handles = [layer.register_forward_pre_hook(record(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                call_model(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    removed = []
    with torch.no_grad():
        for name, layer in layers.items():
            if name not in sums:
                continue  # not reached by the calibration inputs
            shift = sums[name] / counts[name]
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros_like(shift))
            layer.bias.sub_(shift)
            removed.append(float(shift.abs().mean()))
    return len(removed), (sum(removed) / len(removed) if removed else 0.0)


def _layer_output(layer: nn.Module, inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The layer applied to `inputs` with `weight` and no bias."""
    if isinstance(layer, nn.Linear):
        return F.linear(inputs, weight)
    assert isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    output: torch.Tensor = layer._conv_forward(inputs, weight, None)
    return output


def repair(
    model: nn.Module,
    *,
    equalization: bool,
    bias_correction: bool,
    targets: Sequence[str],
    make_observer: Callable[[], Any],
    batches: Sequence[Batch],
) -> Repaired:
    """A batch-norm-folded copy of `model` with the chosen repairs applied (either may be off)."""
    folded = fold_batch_norms(model)
    repaired = Repaired(folded)
    if equalization:
        repaired.equalized_pairs = equalizable_pairs(folded)
        equalize(folded, repaired.equalized_pairs)
    if bias_correction:
        layers, shift = correct_biases(folded, targets, make_observer, batches)
        repaired.corrected_layers, repaired.mean_abs_shift_removed = layers, round(shift, 8)
    return repaired


def quantize_with_repair(
    model: nn.Module,
    options: dict[str, Any],
    ctx: StageContext,
    targets: Sequence[str],
    mapping: Any,
    batches: list[Batch],
    quantize: Callable[[nn.Module, list[Batch]], nn.Module],
) -> tuple[nn.Module, dict[str, Any]]:
    """static_int8 with the repairs the options ask for ("auto", "on" or "off" each).

    "auto" quantizes with and without the repair and keeps it only when the whole model's SQNR against
    the float outputs, on held-out calibration samples, rises by more than AUTO_MARGIN_DB. Returns the
    quantized model and the report: each repair's mode, whether it was applied, and every variant measured.
    """
    modes = {key: str(options.get(key, "auto")) for key in REPAIR_OPTIONS}
    for key, mode in modes.items():
        if mode not in REPAIR_MODES:
            raise EngineError(f"static_int8 {key} must be one of {list(REPAIR_MODES)}, got {mode!r}")
    measuring = "auto" in modes.values()
    calibration, held_out, held_out_source = _held_out(batches, options, ctx) if measuring else (batches, [], None)
    reference = [measure.predict(model, batch).primary for batch in held_out]
    # the layers' own qconfig: a transformer's mapping has no global one (static.py keeps the rest float)
    make_observer = (mapping.global_qconfig or mapping.object_type_qconfigs[nn.Linear]).weight
    choices = [
        (equalization, correction)
        for equalization in _choices(modes["cross_layer_equalization"])
        for correction in _choices(modes["bias_correction"])
    ]
    variants: list[dict[str, Any]] = []
    chosen: tuple[nn.Module, dict[str, Any]] | None = None
    for equalization, correction in choices:
        ctx.check_cancelled()
        repaired = Repaired(model)
        if equalization or correction:
            repaired = repair(
                model,
                equalization=equalization,
                bias_correction=correction,
                targets=targets,
                make_observer=make_observer,
                batches=calibration,
            )
        if equalization and not repaired.equalized_pairs and (False, correction) in choices:
            continue  # nothing to equalize: the same model as without
        quantized = quantize(repaired.model, calibration)
        variant: dict[str, Any] = {
            "cross_layer_equalization": equalization,
            "equalized_pairs": [list(pair) for pair in repaired.equalized_pairs],
            "bias_correction": correction,
            "corrected_layers": repaired.corrected_layers,
            "mean_abs_shift_removed": repaired.mean_abs_shift_removed,
            "held_out_sqnr_db": _sqnr([measure.predict(quantized, b).primary for b in held_out], reference)
            if measuring
            else None,
        }
        variants.append(variant)
        if chosen is None or better(variant["held_out_sqnr_db"], chosen[1]["held_out_sqnr_db"], AUTO_MARGIN_DB):
            chosen = (quantized, variant)
    assert chosen is not None
    quantized, picked = chosen
    report: dict[str, Any] = {
        "cross_layer_equalization": {
            "mode": modes["cross_layer_equalization"],
            "applied": picked["cross_layer_equalization"],
            "pairs": picked["equalized_pairs"],
        },
        "bias_correction": {
            "mode": modes["bias_correction"],
            "applied": picked["bias_correction"],
            "layers": picked["corrected_layers"],
        },
    }
    if measuring:
        baseline = variants[0]["held_out_sqnr_db"]
        report.update(
            held_out_samples=sum(len(b) for b in held_out),
            held_out=held_out_source,
            variants=variants,
            effect_db=(
                None
                if baseline is None or picked["held_out_sqnr_db"] is None
                else round(picked["held_out_sqnr_db"] - baseline, 3)
            ),
        )
    return quantized, report


def _choices(mode: str) -> list[bool]:
    return {"auto": [False, True], "on": [True], "off": [False]}[mode]


def _held_out(batches: list[Batch], options: dict[str, Any], ctx: StageContext) -> tuple[list[Batch], list[Batch], str]:
    """(calibration batches, held-out batches, where the held-out ones come from)."""
    from worker.compression.quantization.static import _calibration_batches

    wanted = int(options.get("calibration_batches") or 16)
    extended = _calibration_batches({**options, "calibration_batches": wanted + HELD_OUT_BATCHES}, ctx)
    if len(extended) > len(batches):
        return batches, extended[len(batches) :], "training samples after the calibration set"
    if len(batches) > 1:
        return batches[:-1], batches[-1:], "the last calibration batch, kept out of calibration"
    return batches, batches, "the calibration samples themselves (too few to hold any out)"


def _sqnr(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float | None:
    signal = sum(float(r.float().pow(2).sum()) for r in reference)
    noise = sum(float((r.float() - o.float()).pow(2).sum()) for r, o in zip(reference, outputs))
    if noise == 0 or signal == 0:
        return None
    return round(10 * math.log10(signal / noise), 3)


def better(candidate: float | None, incumbent: float | None, margin_db: float) -> bool:
    """Whether SQNR `candidate` beats `incumbent` by more than `margin_db` (None means identical outputs)."""
    first = math.inf if candidate is None else candidate
    second = math.inf if incumbent is None else incumbent
    return first > second + margin_db


__all__ = [
    "REPAIR_MODES",
    "REPAIR_OPTIONS",
    "Repaired",
    "better",
    "correct_biases",
    "equalizable_pairs",
    "equalize",
    "fold_batch_norms",
    "quantize_with_repair",
    "repair",
]
