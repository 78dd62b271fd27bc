"""What every stage config shares: the base class, the scheme facts it carries, the common options.

A stage config is a frozen pydantic model, one per (method, scheme). Its fields are the stage's
options with their defaults, bounds and descriptions: the API validates stages with it, `GET
/v1/methods` publishes its JSON schema, and the engine receives an instance of it. The class
variables say what the scheme needs (devices, input formats, a dataset, ...) for the cross-stage
checks of `modelpress.catalog.validate`.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ModelWrapValidatorHandler, PrivateAttr, model_validator

from modelpress.options import MAX_PATTERN_CHARS, LayerSelection, PruneSchedule, TrainOptions

Device = Literal["cpu", "cuda"]

# Model formats as users upload them. state_dict and safetensors become eager
# modules (a registered architecture), exported programs become graph modules.
MODEL_FORMATS = ("torchscript", "state_dict", "safetensors", "exported_program", "huggingface")
EAGER_FORMATS = ("state_dict", "safetensors", "exported_program", "huggingface")


class SpecError(ValueError):
    """A job spec that cannot run; the message says why, for a 422."""


class StageConfig(BaseModel):
    """One stage of a recipe: `method`, `scheme` and the scheme's options (subclasses add them).

    strict: no "5" for 5 and no true for 1; finite floats only; unknown options refused.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    method: str
    scheme: str
    # the nested option objects as given (train, schedule, ...): a job stores what was sent
    _given_objects: dict[str, Any] = PrivateAttr(default_factory=dict)

    # facts about the scheme, not options: what it runs on and what it needs
    summary: ClassVar[str] = ""
    devices: ClassVar[tuple[Device, ...]] = ("cpu",)
    input_formats: ClassVar[tuple[str, ...]] = MODEL_FORMATS
    needs_dataset: ClassVar[bool] = False
    needs_labels: ClassVar[bool] = False
    # Changes weights to a non-float representation: later stages that need
    # float weights (pruning, distillation) cannot follow it.
    quantizes: ClassVar[bool] = False
    min_compute_capability: ClassVar[float | None] = None
    library: ClassVar[str] = ""

    @model_validator(mode="wrap")
    @classmethod
    def _keep_given_objects(cls, data: Any, handler: ModelWrapValidatorHandler[StageConfig]) -> StageConfig:
        config = handler(data)
        if isinstance(data, dict):
            config._given_objects = {
                key: copy.deepcopy(value) for key, value in data.items() if isinstance(value, (dict, list))
            }
        return config

    @classmethod
    def option_names(cls) -> list[str]:
        return [name for name in cls.model_fields if name not in ("method", "scheme")]

    @classmethod
    def tag(cls) -> str:
        """The union's discriminator value: "method:scheme"."""
        return f"{cls.model_fields['method'].default}:{cls.model_fields['scheme'].default}"

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        """Every option at its default (the engine's only source of defaults)."""
        return cls.model_validate({}).options()

    def options(self) -> dict[str, Any]:
        """The options with every default filled in, as plain JSON values (what a job's spec stores).

        Nested objects (train, schedule, layers, candidates) are kept as they were given (their keys
        as sent, validated by their models), so the engine applies its own defaults for the rest.
        """
        values: dict[str, Any] = {}
        for name in self.option_names():
            value = getattr(self, name)
            if name in self._given_objects:
                value = copy.deepcopy(self._given_objects[name])
            elif isinstance(value, BaseModel):
                value = value.model_dump(mode="json", exclude_unset=True)
            elif isinstance(value, list):
                value = list(value)
            elif isinstance(value, dict):
                value = dict(value)
            values[name] = value
        return values

    def as_stage(self) -> dict[str, Any]:
        """The stage as the v1 wire format writes it: {"method", "scheme", **options}."""
        return {"method": self.method, "scheme": self.scheme, **self.options()}


# --------------------------------------------------------------------------- options several schemes share

Pattern = Annotated[str, Field(max_length=MAX_PATTERN_CHARS)]

Amount = Annotated[float, Field(ge=0.0, lt=1.0, description="fraction of weights to remove")]
Layers = Annotated[LayerSelection | None, Field(description='{"include": [globs], "exclude": [globs]} on module names')]
PruneClassifier = Annotated[bool, Field(description="also prune the final classifier layer")]
Schedule = Annotated[
    PruneSchedule | None,
    Field(description='{"steps": N, "finetune_epochs": E}: gradual pruning (Zhu & Gupta 2017); needs a dataset'),
]
Train = Annotated[TrainOptions | None, Field(description="training-loop options (optimizer, lr, epochs, ...)")]
SkipLayers = Annotated[list[str], Field(description="glob patterns of module names left in float")]
KeepEnds = Annotated[bool, Field(description="leave the first and last layers in float")]
CalibrationBatches = Annotated[int, Field(ge=1, le=10_000)]
MinSqnrDb = Annotated[float, Field(ge=0.0, le=200.0)]
MaxAccuracyDrop = Annotated[float, Field(ge=0.0, le=1.0)]
