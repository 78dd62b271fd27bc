"""One entry point for every method: `run_stage(model, method, scheme, options, ctx)`.

Each method module exposes `run_stage(model, scheme, options, ctx) -> StageResult`;
this registry maps method names (those of `modelpress.catalog`) to them.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from worker.compression.base import StageContext, StageResult

_METHOD_MODULES = {
    "prune": "worker.compression.pruning",
    "quantize": "worker.compression.quantization",
    "distill": "worker.compression.distillation",
    "search": "worker.compression.search",
    "encode": "worker.compression.codebook",
    "analyze": "worker.compression.sensitivity",
}


def run_stage(model: nn.Module, method: str, scheme: str, options: dict[str, Any], ctx: StageContext) -> StageResult:
    """Run one stage of a recipe on `model` and return the changed model."""
    module = importlib.import_module(_METHOD_MODULES[method])
    result: StageResult = module.run_stage(model, scheme, options, ctx)
    return result
