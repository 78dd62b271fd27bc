"""Every method's schemes (read off their typed configs in modelpress.configs); the presets; looking a scheme up."""

from __future__ import annotations

from typing import Any

from modelpress.catalog.specs import SchemeSpec, SpecError
from modelpress.configs import DEFAULT_SCHEME, METHODS, STAGE_CONFIGS, config_class

__all__ = ["DEFAULT_SCHEME", "METHODS", "PRESETS", "SCHEMES", "expand_preset", "find_scheme"]

SCHEMES: tuple[SchemeSpec, ...] = tuple(SchemeSpec(config) for config in STAGE_CONFIGS)

# Presets expand into recipes (lists of stages); GET /v1/methods lists them.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu-int8": {
        "summary": "dynamic int8 quantization for CPU serving",
        "stages": [{"method": "quantize", "scheme": "dynamic_int8"}],
    },
    "deep-compression": {
        "summary": "gradual magnitude pruning with fine-tuning, 5-bit k-means weight sharing with centroid "
        "fine-tuning, and Huffman-coded codes and relative index in the weights-only "
        "deep_compression container (Han et al. 2016)",
        "stages": [
            {
                "method": "prune",
                "scheme": "global_l1_unstructured",
                "amount": 0.92,
                "prune_classifier": True,
                "schedule": {"steps": 5, "finetune_epochs": 5},
            },
            {"method": "encode", "scheme": "codebook", "bits": 5, "finetune_epochs": 3},
        ],
    },
    "distill-small": {
        "summary": "distil into a student a quarter of the teacher's width",
        "stages": [{"method": "distill", "scheme": "hinton", "student": "auto", "width_multiplier": 0.25}],
    },
}


def expand_preset(name: str) -> list[dict[str, Any]]:
    if name not in PRESETS:
        raise SpecError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    return [dict(stage) for stage in PRESETS[name]["stages"]]


def find_scheme(method: str, scheme: str | None) -> SchemeSpec:
    """The scheme of (method, scheme); `scheme` None takes the method's default scheme."""
    return SchemeSpec(config_class(method, scheme))
