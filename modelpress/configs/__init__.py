"""One typed config per scheme: the single source of every stage option (no torch).

Each (method, scheme) is a frozen pydantic model in this package, split by method (prune.py,
quantize.py, distill.py, search.py, encode.py, analyze.py). `Stage` is their discriminated
union keyed on "method:scheme" (a stage without a scheme takes its method's default scheme);
`parse_stage` turns a v1 wire stage ({"method": "prune", "scheme": "l1_unstructured",
"amount": 0.8}) into its config, with the 422 messages the API has always given.

To add an option: a field on the scheme's config class here (its default, bounds and description),
then read it in the engine. To add a scheme: a config class here, listed in its method's tuple,
and its handler in worker/compression/handlers.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import Discriminator, Tag, TypeAdapter, ValidationError

from modelpress.configs.analyze import ANALYZE_CONFIGS, SensitivityConfig
from modelpress.configs.base import EAGER_FORMATS, MODEL_FORMATS, Device, SpecError, StageConfig
from modelpress.configs.distill import DISTILL_CONFIGS, HintonConfig
from modelpress.configs.encode import ENCODE_CONFIGS, CodebookConfig
from modelpress.configs.errors import describe_problem
from modelpress.configs.prune import (
    PRUNE_CONFIGS,
    GlobalL1UnstructuredConfig,
    L1UnstructuredConfig,
    LnStructuredConfig,
    NmSemiStructuredConfig,
    RandomUnstructuredConfig,
)
from modelpress.configs.quantize import (
    QUANTIZE_CONFIGS,
    Bf16Config,
    DynamicInt8Config,
    Float8Config,
    Fp16Config,
    Int4WeightOnlyConfig,
    Int8DynamicConfig,
    Int8WeightOnlyConfig,
    QatInt8Config,
    StaticInt8Config,
)
from modelpress.configs.search import SEARCH_CONFIGS, AccuracyAwareConfig
from modelpress.options import object_size_problem

__all__ = [
    "AccuracyAwareConfig",
    "Bf16Config",
    "CodebookConfig",
    "DEFAULT_SCHEME",
    "Device",
    "DynamicInt8Config",
    "EAGER_FORMATS",
    "Float8Config",
    "Fp16Config",
    "GlobalL1UnstructuredConfig",
    "HintonConfig",
    "Int4WeightOnlyConfig",
    "Int8DynamicConfig",
    "Int8WeightOnlyConfig",
    "L1UnstructuredConfig",
    "LnStructuredConfig",
    "METHODS",
    "MODEL_FORMATS",
    "NmSemiStructuredConfig",
    "QatInt8Config",
    "RandomUnstructuredConfig",
    "SensitivityConfig",
    "SpecError",
    "STAGE_ADAPTER",
    "STAGE_CONFIGS",
    "Stage",
    "StageConfig",
    "StaticInt8Config",
    "config_class",
    "parse_stage",
]

# in the order GET /v1/methods lists them
STAGE_CONFIGS: tuple[type[StageConfig], ...] = (
    PRUNE_CONFIGS + QUANTIZE_CONFIGS + DISTILL_CONFIGS + SEARCH_CONFIGS + ENCODE_CONFIGS + ANALYZE_CONFIGS
)
DEFAULT_SCHEME = {"distill": "hinton", "search": "accuracy_aware"}
METHODS = tuple(sorted({str(config.model_fields["method"].default) for config in STAGE_CONFIGS}))
_BY_TAG = {config.tag(): config for config in STAGE_CONFIGS}


def _stage_tag(value: Any) -> str | None:
    """The union's key: "method:scheme", the method's default scheme when none is given."""
    if isinstance(value, StageConfig):
        return f"{value.method}:{value.scheme}"
    if isinstance(value, dict):
        method = value.get("method")
        scheme = value.get("scheme") or DEFAULT_SCHEME.get(str(method))
        return f"{method}:{scheme}"
    return None


def _union() -> Any:
    members = tuple(Annotated[config, Tag(config.tag())] for config in STAGE_CONFIGS)
    # the | operator cannot join a tuple built at run time; Union[tuple] can
    return Annotated[Union[members], Discriminator(_stage_tag)]  # noqa: UP007


Stage = _union()
STAGE_ADAPTER: TypeAdapter[StageConfig] = TypeAdapter(Stage)


def config_class(method: Any, scheme: Any) -> type[StageConfig]:
    """The config class of (method, scheme); `scheme` None takes the method's default scheme."""
    if method not in METHODS:
        raise SpecError(f"unknown method {method!r}; known methods: {list(METHODS)}")
    name = scheme or DEFAULT_SCHEME.get(method)
    if name is None:
        raise SpecError(f"method {method!r} needs a scheme")
    found = _BY_TAG.get(f"{method}:{name}")
    if found is None:
        known = [c.model_fields["scheme"].default for c in STAGE_CONFIGS if c.model_fields["method"].default == method]
        raise SpecError(f"unknown scheme {name!r} for method {method!r}; known schemes: {known}")
    return found


def parse_stage(stage: Any, where: str = "stage") -> StageConfig:
    """A wire stage as its typed config; SpecError naming the field when it is not one.

    Example:
        >>> parse_stage({"method": "prune", "scheme": "l1_unstructured", "amount": 0.8}).amount
        0.8
    """
    if isinstance(stage, StageConfig):
        return stage
    if not isinstance(stage, dict) or "method" not in stage:
        raise SpecError(f"{where} needs a 'method'")
    config = config_class(stage["method"], stage.get("scheme"))
    fields = config.model_fields
    known = config.option_names()
    for key, value in stage.items():
        if key in ("method", "scheme"):
            continue
        if key not in known:
            raise SpecError(
                f"{where}: unknown option {key!r} for {config.tag().replace(':', '/')}; options: {sorted(known)}"
            )
        default = fields[key].get_default(call_default_factory=True)
        if value is None and default is not None:
            raise SpecError(f"{where}.{key} must not be null (leave it out for the default {default!r})")
        if isinstance(value, (dict, list)) and (problem := object_size_problem(value, f"{where}.{key}")):
            raise SpecError(problem)
    try:
        return STAGE_ADAPTER.validate_python(stage)
    except ValidationError as error:
        raise SpecError(describe_problem(error, where)) from None
