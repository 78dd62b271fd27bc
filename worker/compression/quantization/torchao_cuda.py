"""torchao schemes on CUDA (int8_weight_only, int8_dynamic, int4_weight_only, float8)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from modelpress.configs import quantize as configs
from worker.compression.base import EngineError, StageContext
from worker.compression.graph_lift import torch_level_module
from worker.compression.quantization.half import CastWrapper, _output_dtype, _run_or_explain
from worker.compression.quantization.plan import _Done, _keep_changed, _require_targets, plan_layers

# --------------------------------------------------------------------------- CUDA (torchao)


def _torchao_config(scheme: str, options: dict[str, Any]) -> Any:
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
    )
    from torchao.quantization.quantize_.workflows.int4.int4_packing_format import Int4PackingFormat

    if scheme == "int8_weight_only":
        return Int8WeightOnlyConfig()
    if scheme == "int8_dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    if scheme == "int4_weight_only":
        # tinygemm kernels ship with torch's CUDA build; the default "plain" format needs extra kernels.
        return Int4WeightOnlyConfig(
            group_size=int(options.get("group_size") or configs.Int4WeightOnlyConfig().group_size),
            int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D,
        )
    if scheme == "float8":
        return Float8DynamicActivationFloat8WeightConfig()
    raise EngineError(f"unknown torchao scheme {scheme!r}")


def _torchao_cuda(scheme: str) -> Callable[[nn.Module, dict[str, Any], StageContext], _Done]:
    def run(model: nn.Module, options: dict[str, Any], ctx: StageContext) -> _Done:
        return _quantize_with_torchao(model, scheme, options, ctx)

    return run


def _quantize_with_torchao(model: nn.Module, scheme: str, options: dict[str, Any], ctx: StageContext) -> _Done:
    if not torch.cuda.is_available():
        raise EngineError(f"{scheme} runs on CUDA only and this worker has no GPU")
    device = ctx.device if ctx.device.type == "cuda" else torch.device("cuda")
    if scheme == "float8" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise EngineError(f"float8 needs compute capability >= 8.9; this GPU has {major}.{minor}")
    from torchao.quantization import quantize_

    eager = torch_level_module(model) if ctx.kind == "graph" else copy.deepcopy(model)
    out_dtype = _output_dtype(eager, ctx.example_input)
    candidates = [name for name, module in eager.named_modules() if name and type(module) is nn.Linear]
    plan = plan_layers(candidates, options)
    _require_targets(plan, candidates, "Linear layers", scheme)
    work_dtype = torch.bfloat16  # torchao's CUDA kernels (tinygemm int4, float8, int8 mm) are tuned for bf16
    eager = eager.to(device=device, dtype=work_dtype).eval()
    targets = set(plan.targets)
    quantize_(eager, _torchao_config(scheme, options), filter_fn=lambda module, fqn: fqn in targets)
    modules = dict(eager.named_modules())
    # quantize_ swaps the weight for a torchao tensor subclass; a plain tensor means it was passed over
    _keep_changed(
        plan,
        lambda name: type(modules[name].weight) not in (torch.Tensor, nn.Parameter),
        "torchao did not quantize it (shape or dtype not supported by the kernel)",
        scheme,
    )
    wrapped = CastWrapper(eager, work_dtype, out_dtype).eval()
    _run_or_explain(wrapped, ctx.example_input, scheme)
    return _Done(wrapped, "eager", plan, {"device": str(device)})
