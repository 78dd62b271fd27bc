"""The catalogue's types: output formats, and a scheme and its options as `GET /v1/methods` describes them.

Both are read off the scheme's typed config (modelpress.configs), which is the one place options,
defaults and bounds are written.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from modelpress.artifact_formats import OutputFormat
from modelpress.configs import EAGER_FORMATS, MODEL_FORMATS, Device, SpecError, StageConfig

__all__ = [
    "EAGER_FORMATS",
    "MODEL_FORMATS",
    "OUTPUT_FORMATS",
    "Device",
    "OptionKind",
    "OptionSpec",
    "SchemeSpec",
    "SpecError",
]

OptionKind = Literal["float", "int", "bool", "str", "str_list", "object", "str_or_object"]
# the artifact formats' names, from the one table of them (modelpress/artifact_formats.py)
OUTPUT_FORMATS: tuple[str, ...] = get_args(OutputFormat)
_KINDS: dict[str, OptionKind] = {
    "number": "float",
    "integer": "int",
    "boolean": "bool",
    "string": "str",
    "array": "str_list",
    "object": "object",
}


@dataclass(frozen=True)
class OptionSpec:
    """One option in the flat form clients read since v1 (the JSON schema next to it says the same)."""

    name: str
    kind: OptionKind
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    maximum_exclusive: bool = False
    choices: tuple[str, ...] | None = None
    help: str = ""

    @classmethod
    def from_schema(cls, name: str, schema: dict[str, Any]) -> OptionSpec:
        """Read an option off its property in the config's JSON schema."""
        variants = [v for v in schema.get("anyOf", [schema]) if v.get("type") != "null"]
        kinds = {_KINDS.get(v.get("type", "object"), "object") for v in variants}
        kind: OptionKind = "str_or_object" if kinds == {"str", "object"} else kinds.pop()
        bounds = variants[0] if len(variants) == 1 else {}
        maximum = bounds.get("maximum", bounds.get("exclusiveMaximum"))
        minimum = bounds.get("minimum", bounds.get("exclusiveMinimum"))
        choices = bounds.get("enum")
        return cls(
            name=name,
            kind=kind,
            default=schema.get("default"),
            minimum=minimum,
            maximum=maximum,
            maximum_exclusive="exclusiveMaximum" in bounds,
            choices=tuple(choices) if choices else None,
            help=schema.get("description", ""),
        )


@dataclass(frozen=True)
class SchemeSpec:
    """A scheme as the catalogue lists it: its config's class facts and options."""

    config: type[StageConfig]

    @property
    def method(self) -> str:
        return str(self.config.model_fields["method"].default)

    @property
    def name(self) -> str:
        return str(self.config.model_fields["scheme"].default)

    @property
    def options(self) -> tuple[OptionSpec, ...]:
        properties = self.config.model_json_schema()["properties"]
        return tuple(OptionSpec.from_schema(name, properties[name]) for name in self.config.option_names())

    @property
    def summary(self) -> str:
        return self.config.summary

    @property
    def devices(self) -> tuple[Device, ...]:
        return self.config.devices

    @property
    def input_formats(self) -> tuple[str, ...]:
        return self.config.input_formats

    @property
    def needs_dataset(self) -> bool:
        return self.config.needs_dataset

    @property
    def needs_labels(self) -> bool:
        return self.config.needs_labels

    @property
    def quantizes(self) -> bool:
        return self.config.quantizes

    @property
    def min_compute_capability(self) -> float | None:
        return self.config.min_compute_capability

    @property
    def library(self) -> str:
        return self.config.library

    def describe(self) -> dict[str, Any]:
        config = self.config
        return {
            "method": self.method,
            "name": self.name,
            "summary": config.summary,
            "devices": list(config.devices),
            "input_formats": list(config.input_formats),
            "needs_dataset": config.needs_dataset,
            "needs_labels": config.needs_labels,
            "quantizes": config.quantizes,
            "min_compute_capability": config.min_compute_capability,
            "options": [asdict(option) for option in self.options],
            "library": config.library,
            # the config's JSON schema: every option's type, default, bounds and description
            "schema": config.model_json_schema(),
        }
