"""dynamic_int8 without torch.ao: torchao's `Int8DynamicActivationInt8WeightConfig`, and which path runs.

`torch.ao.quantization` is deprecated with removal planned. This path gives the same scheme
(int8 weights per channel, activations quantized per token at each call) through torchao's
tensor subclasses; the result is exported with torch.export and downloads as a `.pt2` whose
graph calls torchao's quant primitives, so loading it needs `import torchao` beside torch.

Measured on this 2-core x86 box at one thread (bench/dynamic_int8.py, BENCHMARKS.md): torchao's
path runs eagerly on CPU without int8 GEMM kernels of its own (`aten._int_mm` plus per-call
quantize ops), and is many times slower than torch.ao's fbgemm kernels and than float itself.
So torch.ao stays the default while it can be imported and is the faster one; this path is
what runs when it is gone.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from worker.compression.base import EngineError, StageContext
from worker.compression.graph_lift import torch_level_module
from worker.compression.quantization.plan import _Done, _keep_changed, _require_targets, plan_layers

# From the side-by-side figures in BENCHMARKS.md ("dynamic int8: torch.ao against torchao"): torch.ao's
# quantize_dynamic artifact beat every torchao / PT2E variant at batch 1 and 64 on an MLP and a BERT.
TORCH_AO_DYNAMIC_IS_FASTER = True


def torch_ao_dynamic_available() -> bool:
    """Whether `torch.ao.quantization.quantize_dynamic` can still be imported from this torch."""
    try:
        from torch.ao.quantization import quantize_dynamic  # noqa: F401
    except ImportError:
        return False
    return True


def use_torch_ao_dynamic() -> bool:
    """torch.ao's dynamic int8 runs while it exists and is measured faster; torchao's otherwise."""
    return TORCH_AO_DYNAMIC_IS_FASTER and torch_ao_dynamic_available()


def _dynamic_int8_torchao(model: nn.Module, options: dict[str, Any], ctx: StageContext) -> _Done:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    if options.get("quantize_embeddings"):
        raise EngineError(
            "quantize_embeddings needs torch.ao.quantization, which this torch no longer has; "
            "the torchao path quantizes Linear layers only"
        )
    if ctx.kind == "torchscript":
        from worker.compression.torchscript_conversion import torchscript_to_graph

        model = torchscript_to_graph(model, ctx.signature, ctx.example_input)
    eager = copy.deepcopy(model) if ctx.kind == "eager" else torch_level_module(model)
    # exact type, as torch.ao's path: subclasses such as MultiheadAttention's out_proj are passed over
    candidates = [name for name, module in eager.named_modules() if name and type(module) is nn.Linear]
    plan = plan_layers(candidates, options)
    _require_targets(plan, candidates, "Linear layers", "dynamic_int8")
    plan.left_float.update(
        {
            name: "the torchao path quantizes Linear only"
            for name, module in eager.named_modules()
            if isinstance(module, (nn.LSTM, nn.GRU, nn.RNNBase, nn.LSTMCell, nn.GRUCell, nn.RNNCell))
        }
    )
    targets = set(plan.targets)
    quantize_(eager.eval(), Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda module, fqn: fqn in targets)
    modules = dict(eager.named_modules())
    # quantize_ swaps the weight for a torchao tensor subclass; a plain tensor means it was passed over
    _keep_changed(
        plan,
        lambda name: type(modules[name].weight) not in (torch.Tensor, nn.Parameter),
        "torchao did not quantize it (shape or dtype not supported)",
        "dynamic_int8",
    )
    return _Done(eager, "eager", plan, {})
