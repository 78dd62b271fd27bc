"""Typed bounds for the nested option objects of a stage (no torch).

The objects under `train`, `schedule`, `layers` and a search's `candidates` are typed
here, and the stage configs of modelpress.configs use them as option types, so a job
that asks for 10^12 epochs, a batch size of 0, NaN learning rates or 10,000 devices
answers 422 at submit instead of failing (or running for ever) on a worker. The bounds
are generous for real training and tight enough that no value can exhaust a worker.
The engine's own checks (worker/compression/training/) still run on top.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_STAGES = 16
MAX_EPOCHS = 10_000
MAX_BATCH_SIZE = 1 << 16
MAX_DEVICES = 64
MAX_SEED = 2**63 - 1
MAX_LEARNING_RATE = 10.0
MAX_PATTERNS = 256
MAX_PATTERN_CHARS = 256
# Any object option (architecture kwargs, feature pairs, search candidates ...) holds at most
# this many JSON values, nested at most this deep.
MAX_OBJECT_NODES = 2_000
MAX_OBJECT_DEPTH = 10

Epochs = Annotated[int, Field(ge=1, le=MAX_EPOCHS)]
EpochCount = Annotated[int, Field(ge=0, le=MAX_EPOCHS)]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class _Strict(BaseModel):
    # strict: no "5" for 5, no true for 1; finite floats only; unknown keys refused
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class TrainOptions(_Strict):
    """The "train" object (see TrainConfig in worker/compression/training/config.py for the meaning)."""

    optimizer: Literal["sgd", "adam", "adamw"] | None = None
    lr: Annotated[float, Field(gt=0.0, le=MAX_LEARNING_RATE)] | None = None
    momentum: Fraction | None = None
    nesterov: bool | None = None
    epochs: Epochs | None = None
    batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH_SIZE)] | None = None
    weight_decay: Annotated[float, Field(ge=0.0, le=10.0)] | None = None
    l1: Annotated[float, Field(ge=0.0, le=10.0)] | None = None
    label_smoothing: Fraction | None = None
    schedule: Literal["none", "step", "multistep", "exponential", "cosine", "plateau"] | None = None
    step_size: Epochs | None = None
    gamma: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    milestones: Annotated[list[Epochs], Field(max_length=1000)] | None = None
    min_lr: Annotated[float, Field(ge=0.0, le=MAX_LEARNING_RATE)] | None = None
    plateau_patience: EpochCount | None = None
    warmup_epochs: EpochCount | None = None
    early_stopping_patience: Epochs | None = None
    val_split: Fraction | None = None
    grad_clip: Annotated[float, Field(gt=0.0, le=1e6)] | None = None
    amp: Literal["bf16", "fp16", "none", False] | None = None
    seed: Seed | None = None
    shuffle: bool | None = None
    devices: Annotated[int, Field(ge=1, le=MAX_DEVICES)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _flatten_schedule(cls, data: Any) -> Any:
        # {"schedule": {"name": "step", "step_size": 5}} means the same as the flat keys
        if isinstance(data, dict) and isinstance(data.get("schedule"), dict):
            nested = dict(data["schedule"])
            if "name" not in nested:
                raise ValueError('train.schedule as an object needs a "name"')
            flat = {key: value for key, value in data.items() if key != "schedule"}
            flat["schedule"] = nested.pop("name")
            for key, value in nested.items():
                flat.setdefault(key, value)
            return flat
        return data


class PruneSchedule(_Strict):
    """Gradual pruning: `steps` pruning steps with `finetune_epochs` of fine-tuning after each."""

    steps: Annotated[int, Field(ge=1, le=100)] = 1
    finetune_epochs: Annotated[int, Field(ge=0, le=1000)] = 1


Pattern = Annotated[str, Field(max_length=MAX_PATTERN_CHARS)]


class LayerSelection(_Strict):
    include: Annotated[list[Pattern], Field(max_length=MAX_PATTERNS)] | None = None
    exclude: Annotated[list[Pattern], Field(max_length=MAX_PATTERNS)] | None = None


class AmountRange(_Strict):
    min: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    max: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None


class SearchCandidates(_Strict):
    recipes: (
        Annotated[
            list[Annotated[list[dict[str, Any]], Field(min_length=1, max_length=MAX_STAGES)]],
            Field(max_length=MAX_STAGES),
        ]
        | None
    ) = None
    amount: AmountRange | None = None


def object_size_problem(value: Any, where: str) -> str | None:
    """Refuse option objects too big or too deep to be a real configuration (cheap, stops early)."""
    budget = MAX_OBJECT_NODES
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        budget -= 1
        if budget < 0:
            return f"{where} holds more than {MAX_OBJECT_NODES} values"
        if depth > MAX_OBJECT_DEPTH:
            return f"{where} is nested deeper than {MAX_OBJECT_DEPTH} levels"
        if isinstance(item, (dict, list)) and len(item) > budget:
            return f"{where} holds more than {MAX_OBJECT_NODES} values"
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, str) and len(item) > 4096:
            return f"{where} holds a string longer than 4096 characters"
    return None
