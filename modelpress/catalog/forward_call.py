"""Checking a declared forward call: named inputs, their shapes, dtypes and ranges, forward kwargs, the output."""

from __future__ import annotations

import math
from typing import Any

from modelpress.catalog.specs import SpecError

# ---------------------------------------------------------------- the forward call

INPUT_DTYPES = ("float16", "float32", "float64", "bfloat16", "int32", "int64", "bool")
INTEGER_DTYPES = ("int32", "int64")
MAX_INPUTS = 16
MAX_INPUT_RANK = 8
MAX_FORWARD_KWARGS = 16
# elements of all example inputs together (8 GiB as float32), as for example_input_shape
MAX_INPUT_ELEMENTS = 2**31
_INT_BOUNDS = {"int32": (-(2**31), 2**31), "int64": (-(2**63), 2**63)}


def validate_forward_call(
    inputs: list[dict[str, Any]] | None,
    forward_kwargs: dict[str, Any] | None,
    output: int | str | None,
    where: str = "",
) -> None:
    """Check a declared forward call (see API.md, "Inputs and outputs as the model takes them").

    `inputs` entries have passed the API's shape model (name, shape, dtype, low, high, dynamic);
    this checks what ties their fields together.

    Example:
        >>> validate_forward_call([{"name": "ids", "shape": [1, 8], "dtype": "int64", "low": 0,
        ...                         "high": 100, "dynamic": [0, 1]}], {"sr": 16000}, 0)
    """
    prefix = f"{where}." if where else ""
    names: set[str] = set()
    total = 0
    for index, spec in enumerate(inputs or []):
        label = f"{prefix}inputs[{index}]"
        name, shape, dtype = spec.get("name"), list(spec.get("shape") or []), spec.get("dtype") or "float32"
        if name in names:
            raise SpecError(f"{label}.name {name!r} is declared twice")
        names.add(str(name))
        if dtype not in INPUT_DTYPES:
            raise SpecError(f"{label}.dtype must be one of {list(INPUT_DTYPES)}, got {dtype!r}")
        if not shape or len(shape) > MAX_INPUT_RANK or any(not isinstance(d, int) or d < 1 for d in shape):
            raise SpecError(f"{label}.shape must hold 1 to {MAX_INPUT_RANK} sizes >= 1, got {shape}")
        total += math.prod(shape)
        for dim in spec.get("dynamic") or []:
            if not 0 <= dim < len(shape):
                raise SpecError(f"{label}.dynamic names dimension {dim}, but the shape {shape} has {len(shape)}")
        low, high = spec.get("low"), spec.get("high")
        if dtype in INTEGER_DTYPES:
            lowest, highest = _INT_BOUNDS[dtype]
            low_value = 0 if low is None else low
            high_value = low_value + 2 if high is None else high
            if not lowest <= low_value < high_value <= highest:
                raise SpecError(
                    f"{label}: low must be < high (high exclusive) within {dtype}, got low={low}, high={high}"
                )
        elif low is not None or high is not None:
            raise SpecError(f"{label}: low / high bound random integers; {dtype} inputs take neither")
    if total > MAX_INPUT_ELEMENTS:
        raise SpecError(f"{prefix}inputs hold {total} elements in all; at most {MAX_INPUT_ELEMENTS}")
    kwargs = forward_kwargs or {}
    if len(kwargs) > MAX_FORWARD_KWARGS:
        raise SpecError(f"{prefix}forward_kwargs holds at most {MAX_FORWARD_KWARGS} arguments")
    for key, value in kwargs.items():
        if not key.isidentifier():
            raise SpecError(f"{prefix}forward_kwargs: {key!r} is not a Python argument name")
        if key in names:
            raise SpecError(f"{prefix}forward_kwargs: {key!r} is also a declared input")
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise SpecError(
                f"{prefix}forward_kwargs.{key} must be a number, string, bool or null; tensors go in inputs"
            )
        if isinstance(value, str) and len(value) > 256:
            raise SpecError(f"{prefix}forward_kwargs.{key}: strings hold at most 256 characters")
        if isinstance(value, float) and not math.isfinite(value):
            raise SpecError(f"{prefix}forward_kwargs.{key} must be finite")
    if isinstance(output, int) and not isinstance(output, bool) and not 0 <= output < 1024:
        raise SpecError(f"{prefix}output index must be in 0..1023, got {output}")
    if isinstance(output, str) and not (0 < len(output) <= 128):
        raise SpecError(f"{prefix}output key must hold 1 to 128 characters")
