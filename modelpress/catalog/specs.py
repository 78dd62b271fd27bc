"""The catalogue's types: model and output formats, an option, a scheme, and the error a spec that cannot run raises."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import ValidationError

from modelpress.options import OPTION_MODELS, first_problem, object_size_problem

OptionKind = Literal["float", "int", "bool", "str", "str_list", "object", "str_or_object"]
Device = Literal["cpu", "cuda"]

# Model formats as users upload them. state_dict and safetensors become eager
# modules (a registered architecture), exported programs become graph modules.
MODEL_FORMATS = ("torchscript", "state_dict", "safetensors", "exported_program")
EAGER_FORMATS = ("state_dict", "safetensors", "exported_program")
OUTPUT_FORMATS = (
    "torchscript",
    "exported_program",
    "state_dict",
    "sparse_state_dict",
    "compact_state_dict",
    "deep_compression",
    "onnx",
    "executorch",
)
# The download's file extension per artifact format (GET /v1/jobs/{id}/artifact names the file with it).
ARTIFACT_EXTENSIONS = {
    "torchscript": "pt",
    "exported_program": "pt2",
    "state_dict": "pt",
    "sparse_state_dict": "pt",
    "compact_state_dict": "pt",
    "deep_compression": "mpdc",
    "onnx": "onnx",
    "executorch": "pte",
}


class SpecError(ValueError):
    """A job spec that cannot run; the message says why, for a 422."""


@dataclass(frozen=True)
class OptionSpec:
    name: str
    kind: OptionKind
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    maximum_exclusive: bool = False
    choices: tuple[str, ...] | None = None
    help: str = ""

    def validate(self, value: Any, where: str) -> None:
        label = f"{where}.{self.name}"
        if self.kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SpecError(f"{label} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise SpecError(f"{label} must be a finite number, got {value!r}")
        elif self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise SpecError(f"{label} must be an integer, got {value!r}")
        elif self.kind == "bool":
            if not isinstance(value, bool):
                raise SpecError(f"{label} must be true or false, got {value!r}")
        elif self.kind == "str":
            if not isinstance(value, str) or len(value) > 256:
                raise SpecError(f"{label} must be a string of at most 256 characters, got {value!r:.80}")
        elif self.kind == "str_list":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise SpecError(f"{label} must be a list of strings")
        elif self.kind == "object":
            if not isinstance(value, dict):
                raise SpecError(f"{label} must be an object")
        elif self.kind == "str_or_object":
            if not isinstance(value, (str, dict)):
                raise SpecError(f"{label} must be a string or an object")
        if self.kind in ("float", "int"):
            if self.minimum is not None and value < self.minimum:
                raise SpecError(f"{label} must be >= {self.minimum}, got {value}")
            if self.maximum is not None:
                too_big = value >= self.maximum if self.maximum_exclusive else value > self.maximum
                if too_big:
                    bound = "<" if self.maximum_exclusive else "<="
                    raise SpecError(f"{label} must be {bound} {self.maximum}, got {value}")
        if self.choices is not None and value not in self.choices:
            raise SpecError(f"{label} must be one of {list(self.choices)}, got {value!r}")
        if self.kind in ("str_list", "object", "str_or_object"):
            if problem := object_size_problem(value, label):
                raise SpecError(problem)
        model = OPTION_MODELS.get(self.name)
        if model is not None and isinstance(value, dict):
            try:
                model.model_validate(value)
            except ValidationError as error:
                raise SpecError(first_problem(error, label)) from None


@dataclass(frozen=True)
class SchemeSpec:
    method: str
    name: str
    summary: str
    devices: tuple[Device, ...] = ("cpu",)
    input_formats: tuple[str, ...] = MODEL_FORMATS
    needs_dataset: bool = False
    needs_labels: bool = False
    # Changes weights to a non-float representation: later stages that need
    # float weights (pruning, distillation) cannot follow it.
    quantizes: bool = False
    min_compute_capability: float | None = None
    options: tuple[OptionSpec, ...] = ()
    library: str = ""

    def describe(self) -> dict[str, Any]:
        data = asdict(self)
        data["options"] = [asdict(o) for o in self.options]
        return data
