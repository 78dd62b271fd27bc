"""SmoothQuant-style migration of activation outliers into weights (Xiao et al. 2023), before dynamic int8.

Transformers carry a few hidden channels whose activations are 10-100x the rest
(Dettmers et al. 2022). Dynamic int8 quantizes a Linear's input with one scale per
tensor, so those channels set the scale and every other channel loses its bits.
SmoothQuant divides input channel j by s_j and multiplies the weight's column j by
s_j, which leaves the product unchanged in float:

    s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)

with max|X_j| measured on the job's calibration data. The weight is quantized per
output channel, so a column scaled up costs it little; the activation's range
flattens.

Where the 1/s goes: when every reader of a LayerNorm's output is a smoothed
Linear (pre-LN blocks: OPT, LLaMA-style), 1/s is folded into the LayerNorm's
weight and bias and the model gains no op. Otherwise (post-LN BERT, where the
LayerNorm output also feeds the residual; GELU outputs) a forward pre-hook on the
Linear multiplies its input by 1/s. The hook survives `quantize_dynamic` (it
copies pre-hooks onto the quantized module) and `torch.jit.trace` records it, so
the artifact stays a plain TorchScript file: one elementwise multiply per Linear.

torchao 0.18 has its own SmoothQuant (`torchao.prototype.smoothquant`), but its
result is a torchao tensor subclass that TorchScript cannot hold, so the artifact
would change format and need torchao to load; folding into the float weights
keeps the int8 artifact exactly as plain dynamic int8 makes it.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from worker.compression.base import EngineError, StageContext
from worker.compression.inputs import Batch

__all__ = ["InputScale", "smooth_linears"]

# Floors keep s finite for dead channels (all-zero activations or weight columns).
_MIN_RANGE = 1e-5


class InputScale:
    """Forward pre-hook: multiplies a Linear's input by a fixed per-channel vector (1/s)."""

    def __init__(self, inverse_scale: torch.Tensor) -> None:
        self.inverse_scale = inverse_scale

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0] * self.inverse_scale.to(args[0].dtype), *args[1:])


@dataclass
class Smoothed:
    """The smoothed float model (same kind as handed in, graph models lifted to eager) and a report."""

    model: nn.Module
    ctx: StageContext
    info: dict[str, Any]


def smooth_linears(
    model: nn.Module, batches: Sequence[Batch], alpha: float, targets: Sequence[str], ctx: StageContext
) -> Smoothed:
    """Migrate activation outliers of the Linears named in `targets` into their weights.

    Args:
        model: an eager module or an exported program's `.module()` (lifted to a torch-level module).
        batches: calibration inputs; each Linear's per-input-channel max |x| is taken over all of them.
        alpha: migration strength in [0, 1]; 0.5 splits the range evenly (the paper's default for OPT/BERT).
        targets: names of the nn.Linear modules to smooth (skipped layers left out by the caller).
        ctx: the stage context; the returned one says "eager" when a graph model was lifted.

    Returns:
        A copy of the model, equal in float up to rounding, with 1/s folded into LayerNorms or applied by
        input hooks; info reports alpha, where each 1/s went, and the activations' outlier ratio
        (largest channel max over the median channel max, worst layer) before and after.

    Example:
        >>> smoothed = smooth_linears(model, [ids], 0.5, ["layers.0.query"], ctx)
    """
    if not 0.0 <= alpha <= 1.0:
        raise EngineError(f"smoothquant alpha must be in [0, 1], got {alpha}")
    if ctx.kind == "torchscript":
        raise EngineError(
            "smoothquant needs an eager model or an exported program; a TorchScript model's "
            "weights and LayerNorms cannot be rewritten"
        )
    if ctx.kind == "graph":
        from worker.compression.quantization import torch_level_module

        working: nn.Module = torch_level_module(model)
        ctx = replace(ctx, kind="eager")
    else:
        working = copy.deepcopy(model).eval()
    modules = dict(working.named_modules())
    linears = {name: modules[name] for name in targets if type(modules.get(name)) is nn.Linear}
    if not linears:
        raise EngineError("smoothquant found no Linear layer to smooth")
    activation_max = _input_channel_max(working, linears, batches, ctx)
    scales: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, linear in linears.items():
            weight_max = linear.weight.abs().amax(dim=0).clamp_min(_MIN_RANGE)
            scale = activation_max[name].clamp_min(_MIN_RANGE).pow(alpha) / weight_max.pow(1.0 - alpha)
            scales[name] = scale.clamp_min(_MIN_RANGE)
    folded = _fold_into_layer_norms(working, linears, scales, ctx.example_input)
    with torch.no_grad():
        for name, linear in linears.items():
            linear.weight.mul_(scales[name])
            if name not in folded:
                linear.register_forward_pre_hook(InputScale((1.0 / scales[name]).to(linear.weight.dtype)))
    after = {name: activation_max[name] / scales[name] for name in linears}
    info = {
        "alpha": alpha,
        "smoothed_layers": len(linears),
        "folded_into_layer_norm": sorted(folded),
        "input_hooks": sorted(set(linears) - set(folded)),
        "calibration_samples": sum(len(batch) for batch in batches),
        "outlier_ratio_before": round(_worst_outlier_ratio(activation_max), 2),
        "outlier_ratio_after": round(_worst_outlier_ratio(after), 2),
    }
    return Smoothed(working, ctx, info)


def _input_channel_max(
    model: nn.Module, linears: dict[str, nn.Module], batches: Sequence[Batch], ctx: StageContext
) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}

    def observer(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            value = args[0].detach()
            channel_max = value.abs().reshape(-1, value.shape[-1]).amax(dim=0).float()
            found[name] = torch.maximum(found[name], channel_max) if name in found else channel_max

        return hook

    handles = [linear.register_forward_pre_hook(observer(name)) for name, linear in linears.items()]
    try:
        with torch.no_grad():
            for index, batch in enumerate(batches):
                ctx.check_cancelled()
                model(batch)
                ctx.progress(0.5 * (index + 1) / len(batches), "smoothquant: measuring activation ranges")
    finally:
        for handle in handles:
            handle.remove()
    unseen = sorted(set(linears) - set(found))
    if unseen:
        raise EngineError(f"smoothquant: the calibration data never reached {', '.join(unseen)}")
    return found


def _worst_outlier_ratio(channel_max: dict[str, torch.Tensor]) -> float:
    return max(float(values.max() / values.median().clamp_min(_MIN_RANGE)) for values in channel_max.values())


def _fold_into_layer_norms(
    model: nn.Module, linears: dict[str, nn.Module], scales: dict[str, torch.Tensor], example_input: Batch
) -> set[str]:
    """Divide LayerNorm weight and bias by s where every reader of the LayerNorm's output is a Linear of
    `linears`; returns the Linears whose 1/s went there. The readers are found in the exported graph.

    Readers sharing one LayerNorm need one s: theirs is recomputed as the activation range over the largest
    weight range among them, as SmoothQuant does for q/k/v.
    """
    readers = _layer_norm_readers(model, example_input)
    modules = dict(model.named_modules())
    folded: set[str] = set()
    with torch.no_grad():
        for norm_name, names in readers.items():
            norm = modules.get(norm_name)
            if (
                not isinstance(norm, nn.LayerNorm)
                or not norm.elementwise_affine
                or not names
                or not all(name in linears for name in names)
            ):
                continue
            # the readers share X, so s_i = X^a / W_i^(1-a); the largest W range over them gives the smallest s
            shared = torch.stack([scales[name] for name in names]).amin(dim=0)
            for name in names:
                scales[name] = shared
            norm.weight.div_(shared)
            if norm.bias is not None:
                norm.bias.div_(shared)
            folded.update(names)
    return folded


def _layer_norm_readers(model: nn.Module, example_input: Batch) -> dict[str, list[str]]:
    """LayerNorm module name -> the Linear modules reading its output, only where Linears are its only readers."""
    try:
        program = torch.export.export(model, (example_input[:2],), strict=False)
    except Exception:  # a model torch.export cannot trace keeps every 1/s in input hooks
        return {}
    aten = torch.ops.aten
    found: dict[str, list[str]] = {}
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target not in (aten.layer_norm.default, aten.native_layer_norm.default):
            continue
        norm_name = _owner(node)
        outputs = (
            [node]
            if node.target is aten.layer_norm.default
            else [user for user in node.users if user.target is operator.getitem and user.args[1] == 0]
        )
        users = [user for output in outputs for user in output.users]
        if norm_name is None or not users or any(user.target is not aten.linear.default for user in users):
            continue
        names = [_owner(user) for user in users]
        if any(name is None for name in names):
            continue
        found[norm_name] = [name for name in names if name is not None]
    return found


def _owner(node: Any) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, _type = list(stack.values())[-1]
    # nn_module_stack paths are attribute accesses such as "L['self'].layers[0].norm" or "layers.0.norm"
    return str(path).replace("L['self'].", "").replace("[", ".").replace("]", "")


def smooth_for_stage(model: nn.Module, scheme: str, options: dict[str, Any], ctx: StageContext) -> Smoothed:
    """`smooth_linears` with a quantize stage's options: its scheme, skip_layers, alpha and calibration data."""
    from worker.compression.quantization import _calibration_batches, plan_layers

    if scheme != "dynamic_int8":
        raise EngineError(f"smoothquant is an option of dynamic_int8, not {scheme}")
    if ctx.train_data is None or len(ctx.train_data) == 0:
        raise EngineError("smoothquant measures activation ranges on calibration data: give the job a dataset_id")
    candidates = [name for name, module in _named_linears(model, ctx)]
    plan = plan_layers(candidates, options)
    batches = _calibration_batches(options, ctx)
    return smooth_linears(model, batches, float(options["alpha"]), plan.targets, ctx)


def _named_linears(model: nn.Module, ctx: StageContext) -> list[tuple[str, nn.Module]]:
    if ctx.kind == "graph":
        # linears of an exported program are named after their parameters' owner once lifted
        from worker.compression.quantization import torch_level_module

        model = torch_level_module(model)
    return [(name, module) for name, module in model.named_modules() if name and type(module) is nn.Linear]
