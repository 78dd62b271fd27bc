"""The catalogue of methods, schemes and their options.

Pure data and validation, no torch. Every scheme's options, defaults and bounds are written once,
as a typed config in `modelpress.configs`; this package reads them: the API validates job specs
with it at submit time (so a job that cannot run answers 422 before any worker time is spent),
`GET /v1/methods` publishes it, and the engine receives the same configs, so the three can never
disagree.

Layout: `specs` (formats; a scheme and its options as published), `schemes` (the schemes, the presets),
`validate` (a job's stages), `runtimes` (ONNX Runtime / ExecuTorch targets), `forward_call`
(declared inputs and outputs); every public name is importable from `modelpress.catalog`.
"""

from __future__ import annotations

from typing import Any

from modelpress.catalog.forward_call import (
    INPUT_DTYPES,
    INTEGER_DTYPES,
    MAX_FORWARD_KWARGS,
    MAX_INPUT_ELEMENTS,
    MAX_INPUT_RANK,
    MAX_INPUTS,
    validate_forward_call,
)
from modelpress.catalog.runtimes import RUNTIMES, TORCH_FORMATS, RuntimeSpec, resolve_runtime, validate_target
from modelpress.catalog.schemes import DEFAULT_SCHEME, METHODS, PRESETS, SCHEMES, expand_preset, find_scheme
from modelpress.catalog.specs import (
    EAGER_FORMATS,
    MODEL_FORMATS,
    OUTPUT_FORMATS,
    Device,
    OptionKind,
    OptionSpec,
    SchemeSpec,
    SpecError,
)
from modelpress.catalog.validate import JobFacts, ValidatedStage, trial_refusals, validate_stages

__all__ = [
    "DEFAULT_SCHEME",
    "describe_methods",
    "Device",
    "EAGER_FORMATS",
    "expand_preset",
    "find_scheme",
    "INPUT_DTYPES",
    "INTEGER_DTYPES",
    "JobFacts",
    "MAX_FORWARD_KWARGS",
    "MAX_INPUT_ELEMENTS",
    "MAX_INPUT_RANK",
    "MAX_INPUTS",
    "METHODS",
    "MODEL_FORMATS",
    "OptionKind",
    "OptionSpec",
    "OUTPUT_FORMATS",
    "PRESETS",
    "resolve_runtime",
    "RUNTIMES",
    "RuntimeSpec",
    "SCHEMES",
    "SchemeSpec",
    "SpecError",
    "TORCH_FORMATS",
    "validate_forward_call",
    "trial_refusals",
    "validate_stages",
    "validate_target",
    "ValidatedStage",
]


def describe_methods() -> dict[str, Any]:
    """The catalogue as `GET /v1/methods` publishes it."""
    return {
        "methods": [
            {"method": method, "schemes": [s.describe() for s in SCHEMES if s.method == method]} for method in METHODS
        ],
        "presets": [{"name": name, "summary": p["summary"], "stages": p["stages"]} for name, p in PRESETS.items()],
        "output_formats": list(OUTPUT_FORMATS),
        "runtimes": [
            {
                "runtime": "torch",
                "output_formats": list(TORCH_FORMATS),
                "devices": ["cpu", "cuda"],
                "schemes": {m: [s.name for s in SCHEMES if s.method == m] for m in METHODS},
            }
        ]
        + [
            {
                "runtime": r.name,
                "output_formats": [r.output_format],
                "devices": list(r.devices),
                "schemes": {m: list(s) for m, s in r.schemes.items()},
                "library": r.library,
            }
            for r in RUNTIMES.values()
        ],
        "model_formats": list(MODEL_FORMATS),
    }
