"""The engine's one entry point: `compress(model, config, context)`, as torchao's `quantize_(model, config)`.

`HANDLERS` maps each stage config type of `modelpress.configs` to the engine function that runs it;
tests/engine/test_handlers.py holds that every config has a handler and every handler a config,
so a scheme the API accepts always runs. The method modules are imported when a stage runs, so
importing this table costs no torch extension loading.

To add a scheme: its config class in modelpress/configs/<method>.py and one line here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from torch import nn

from modelpress.configs import (
    AccuracyAwareConfig,
    Bf16Config,
    CodebookConfig,
    DynamicInt8Config,
    Float8Config,
    Fp16Config,
    GlobalL1UnstructuredConfig,
    HintonConfig,
    Int4WeightOnlyConfig,
    Int8DynamicConfig,
    Int8WeightOnlyConfig,
    L1UnstructuredConfig,
    LnStructuredConfig,
    NmSemiStructuredConfig,
    QatInt8Config,
    RandomUnstructuredConfig,
    SensitivityConfig,
    StageConfig,
    StaticInt8Config,
)
from worker.compression.base import EngineError, StageContext, StageResult

Handler = Callable[[nn.Module, StageConfig, StageContext], StageResult]


def _method_module(module_name: str) -> Handler:
    """A handler that runs the config through `module_name.run_stage(model, scheme, options, ctx)`.

    The method modules take the options as the config's dict view, every default filled in by the
    config (their direct callers, the engine tests, pass partial dicts).
    """

    def handle(model: nn.Module, config: StageConfig, context: StageContext) -> StageResult:
        module = importlib.import_module(module_name)
        result: StageResult = module.run_stage(model, config.scheme, config.options(), context)
        return result

    handle.__name__ = handle.__qualname__ = f"run_{module_name.rpartition('.')[2]}"
    return handle


_prune = _method_module("worker.compression.pruning")
_quantize = _method_module("worker.compression.quantization")
_distill = _method_module("worker.compression.distillation")
_search = _method_module("worker.compression.search")
_encode = _method_module("worker.compression.codebook")
_analyze = _method_module("worker.compression.sensitivity")

HANDLERS: dict[type[StageConfig], Handler] = {
    L1UnstructuredConfig: _prune,
    RandomUnstructuredConfig: _prune,
    GlobalL1UnstructuredConfig: _prune,
    LnStructuredConfig: _prune,
    NmSemiStructuredConfig: _prune,
    DynamicInt8Config: _quantize,
    StaticInt8Config: _quantize,
    QatInt8Config: _quantize,
    Fp16Config: _quantize,
    Bf16Config: _quantize,
    Int8WeightOnlyConfig: _quantize,
    Int8DynamicConfig: _quantize,
    Int4WeightOnlyConfig: _quantize,
    Float8Config: _quantize,
    HintonConfig: _distill,
    AccuracyAwareConfig: _search,
    CodebookConfig: _encode,
    SensitivityConfig: _analyze,
}


def compress(model: nn.Module, config: StageConfig, context: StageContext) -> StageResult:
    """Run one stage of a recipe on `model` and return the changed model.

    Example:
        >>> compress(model, L1UnstructuredConfig(amount=0.8), StageContext("eager", x)).info["sparsity"]
        0.8
    """
    handler = HANDLERS.get(type(config))
    if handler is None:
        raise EngineError(f"no engine handler for {config.method}/{config.scheme}")
    return handler(model, config, context)
