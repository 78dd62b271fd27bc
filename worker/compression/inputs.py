"""The model's forward call as the job declares it: named inputs, constant arguments, outputs.

Every place of the engine that runs a model (pre-flight, calibration, fine-tuning,
evaluation, latency, fidelity, tracing and export) goes through this module, so a
BERT taking `(input_ids, attention_mask)` or an audio model taking `(x, sr=16000)`
is fed the same way everywhere.

A batch is either a plain tensor (the `example_input_shape` shorthand: one float
input, no constant arguments) or a `ModelInputs`: the ordered named tensors plus
the constant keyword arguments. `ModelInputs` slices, indexes and moves like a
tensor along the batch dimension, so code that walks a dataset batch by batch does
not care which one it holds.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from worker.compression.base import EngineError

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
# torch.export specialises dimensions of size 0 and 1, so examples for an export use at least this
MIN_DYNAMIC_SIZE = 2
MAX_DYNAMIC_SIZE = 4096

OutputSelector = int | str | None


@dataclass(frozen=True)
class InputSpec:
    """One positional tensor of the forward call (validated by the API; see modelpress.catalog)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    low: int | None = None
    high: int | None = None
    dynamic: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        return cls(
            name=str(data["name"]),
            shape=tuple(int(s) for s in data["shape"]),
            dtype=str(data.get("dtype") or "float32"),
            low=data.get("low"),
            high=data.get("high"),
            dynamic=tuple(int(d) for d in data.get("dynamic") or ()),
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class Signature:
    """How to call the model: positional tensors in order, constant keyword arguments, the output to score."""

    inputs: tuple[InputSpec, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    output: OutputSelector = None

    @classmethod
    def from_request(
        cls,
        inputs: list[dict[str, Any]] | None,
        example_input_shape: list[int] | None,
        forward_kwargs: dict[str, Any] | None = None,
        output: OutputSelector = None,
    ) -> Signature | None:
        """The declared signature, the one-float-tensor shorthand, or None (the dataset gives the shape)."""
        if inputs:
            specs = tuple(InputSpec.from_dict(item) for item in inputs)
        elif example_input_shape:
            specs = (InputSpec("inputs", tuple(example_input_shape), "float32", dynamic=(0,)),)
        elif forward_kwargs or output is not None:
            specs = ()
        else:
            return None
        return cls(specs, dict(forward_kwargs or {}), output)

    @property
    def is_single_tensor(self) -> bool:
        """One float input and no constant arguments: batches are plain tensors."""
        return len(self.inputs) == 1 and not self.kwargs and self.inputs[0].torch_dtype.is_floating_point

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.inputs]


class ModelInputs:
    """Named tensors (first axis = samples) and constant keyword arguments of one forward call."""

    def __init__(self, tensors: Sequence[Tensor], names: Sequence[str], kwargs: dict[str, Any] | None = None):
        if len(tensors) != len(names):
            raise EngineError(f"{len(tensors)} tensors for {len(names)} input names")
        self.tensors = tuple(tensors)
        self.names = tuple(names)
        self.kwargs = dict(kwargs or {})

    def __len__(self) -> int:
        return int(self.tensors[0].shape[0]) if self.tensors else 0

    def __getitem__(self, index: Any) -> ModelInputs:
        return ModelInputs([t[index] for t in self.tensors], self.names, self.kwargs)

    def __repr__(self) -> str:
        shapes = ", ".join(
            f"{n}{list(t.shape)}:{str(t.dtype).removeprefix('torch.')}" for n, t in zip(self.names, self.tensors)
        )
        return f"ModelInputs({shapes}; {self.kwargs})"

    def to(self, *args: Any, **kwargs: Any) -> ModelInputs:
        return ModelInputs([t.to(*args, **kwargs) for t in self.tensors], self.names, self.kwargs)

    def clone(self) -> ModelInputs:
        return ModelInputs([t.clone() for t in self.tensors], self.names, self.kwargs)

    def split(self, size: int) -> list[ModelInputs]:
        return [self[start : start + size] for start in range(0, len(self), size)]

    @property
    def shape(self) -> torch.Size:
        """The first input's shape (what messages about "the input" name)."""
        return self.tensors[0].shape

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors[0].dtype

    def dim(self) -> int:
        return self.tensors[0].dim()

    def is_floating_point(self) -> bool:
        return all(t.is_floating_point() for t in self.tensors)

    def float(self) -> Tensor:
        """The float inputs concatenated flat (for statistics such as the std of an augmentation)."""
        floats = [t.float().flatten() for t in self.tensors if t.is_floating_point()]
        if not floats:
            raise EngineError("the model's inputs hold no floating-point tensor")
        return torch.cat(floats)

    def describe(self) -> str:
        return repr(self)


Batch = Tensor | ModelInputs


def as_call(inputs: Batch) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(positional args, keyword args) of a forward call on `inputs`."""
    if isinstance(inputs, ModelInputs):
        return inputs.tensors, inputs.kwargs
    return (inputs,), {}


def call_model(model: nn.Module | Any, inputs: Batch) -> Any:
    """`model(*tensors, **kwargs)` of a batch; the one way the engine runs a model."""
    args, kwargs = as_call(inputs)
    return model(*args, **kwargs)


def positional_with_constants(model: nn.Module, inputs: Batch) -> tuple[Any, ...]:
    """The call as positional args only, constants placed by the forward's schema (for tracers
    such as torch's TorchScript converter that take no keyword arguments)."""
    args, kwargs = as_call(inputs)
    if not kwargs:
        return tuple(args)
    schema = getattr(getattr(model, "forward", None), "schema", None)
    if schema is None:
        raise EngineError("constant arguments need a TorchScript forward with a schema to place them")
    names = [a.name for a in schema.arguments][1:]  # self first
    ordered: list[Any] = list(args)
    for name in names[len(args) :]:
        if name not in kwargs:
            break
        ordered.append(kwargs[name])
    missing = set(kwargs) - set(names[len(args) : len(ordered)])
    if missing:
        raise EngineError(f"forward_kwargs {sorted(missing)} are not arguments of forward({', '.join(names)})")
    return tuple(ordered)


def make_example(signature: Signature, batch: int | None = None, seed: int = 0, min_dynamic: int = 1) -> Batch:
    """Seeded inputs of the declared shapes and dtypes (batch size overridden when given).

    Floats are standard normal; integers uniform in [low, high) (default [0, 2)); bools random.
    `min_dynamic` raises every declared dynamic dimension to at least that size (exports need 2).
    """
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for spec in signature.inputs:
        shape = list(spec.shape)
        if batch is not None and shape:
            shape[0] = batch
        for dim in spec.dynamic:
            if dim < len(shape):
                shape[dim] = max(shape[dim], min_dynamic)
        dtype = spec.torch_dtype
        if dtype.is_floating_point:
            tensor = torch.randn(shape, generator=generator).to(dtype)
        elif dtype == torch.bool:
            tensor = torch.randint(0, 2, shape, generator=generator).bool()
        else:
            low = 0 if spec.low is None else int(spec.low)
            high = low + 2 if spec.high is None else int(spec.high)
            tensor = torch.randint(low, high, shape, generator=generator, dtype=dtype)
        tensors.append(tensor)
    if signature.is_single_tensor:
        return tensors[0]
    return ModelInputs(tensors, signature.names, signature.kwargs)


def batch_of(inputs: Batch, size: int) -> Batch:
    """At most `size` samples; repeats the samples when there are fewer (an export needs >= 2)."""
    if len(inputs) >= size:
        return inputs[:size]
    repeats = -(-size // max(1, len(inputs)))
    if isinstance(inputs, ModelInputs):
        return ModelInputs(
            [t.repeat(repeats, *([1] * (t.dim() - 1)))[:size] for t in inputs.tensors], inputs.names, inputs.kwargs
        )
    return inputs.repeat(repeats, *([1] * (inputs.dim() - 1)))[:size]


def export_dynamic_shapes(signature: Signature | None, inputs: Batch) -> Any:
    """`dynamic_shapes` for torch.export: the declared dynamic dimensions (the batch by default).

    Dimensions of the same index and the same example size share one `Dim` (a BERT's ids and
    mask have one batch and one sequence length); `Dim.AUTO` would let export guess instead.
    """
    args, _ = as_call(inputs)
    declared: list[tuple[int, ...]] = []
    for position, tensor in enumerate(args):
        if signature is not None and position < len(signature.inputs):
            declared.append(signature.inputs[position].dynamic)
        else:
            declared.append((0,) if isinstance(tensor, Tensor) and tensor.dim() else ())
    dims: dict[tuple[int, int], Any] = {}
    shapes: list[dict[int, Any] | None] = []
    for tensor, dynamic in zip(args, declared):
        if not isinstance(tensor, Tensor):
            shapes.append(None)
            continue
        entry = {}
        for dim in dynamic:
            if dim >= tensor.dim():
                continue
            key = (dim, int(tensor.shape[dim]))
            if key not in dims:
                name = "batch" if dim == 0 else f"dim{dim}_{len(dims)}"
                dims[key] = torch.export.Dim(name, min=1, max=MAX_DYNAMIC_SIZE)
            entry[dim] = dims[key]
        shapes.append(entry or None)
    return tuple(shapes)


def export_program(model: nn.Module, signature: Signature | None, inputs: Batch) -> torch.export.ExportedProgram:
    """torch.export with the declared dynamic dimensions, on an example where they are >= 2."""
    example = export_example(signature, inputs)
    args, kwargs = as_call(example)
    shapes = _as_forward_binds(model, args, kwargs, export_dynamic_shapes(signature, example))
    try:
        return export_within_model_bounds(model, args, kwargs, shapes)
    except Exception as error:
        raise EngineError(
            f"torch.export could not export the model with dynamic dimensions "
            f"{_dynamic_names(signature)}: {_last_line(error)}. Declare only the dimensions that "
            "really vary in `inputs[].dynamic`"
        ) from error


def export_example(signature: Signature | None, inputs: Batch) -> Batch:
    """A few samples of `inputs` with every declared dynamic dimension at least 2 (torch.export
    specialises sizes 0 and 1)."""
    example = batch_of(inputs, max(MIN_DYNAMIC_SIZE, min(len(inputs), 8)))
    if signature is not None and not signature.is_single_tensor and signature.inputs:
        assert isinstance(example, ModelInputs)  # a multi-input signature always builds ModelInputs
        example = _stretch_dynamic(example, signature)
    return example


def export_within_model_bounds(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None, shapes: Any
) -> torch.export.ExportedProgram:
    """torch.export; when the model bounds a dynamic dimension more tightly than asked (a BERT's
    sequence by its position embeddings, an uploaded program's batch by its own range), once more
    with the range export suggests, instead of failing or specialising."""
    try:
        return torch.export.export(model, args, kwargs or None, dynamic_shapes=shapes)
    except Exception as error:
        from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes

        fixes = [line for line in str(error).splitlines() if re.match(r"\s+\w+ = Dim\(", line)]
        if "Suggested fixes" not in str(error) or not fixes:
            raise
        refined = refine_dynamic_shapes_from_suggested_fixes("Suggested fixes:\n" + "\n".join(fixes), shapes)
        return torch.export.export(model, args, kwargs or None, dynamic_shapes=refined)


def _as_forward_binds(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], shapes: tuple[Any, ...]) -> Any:
    """`shapes` (one per positional tensor) laid out as torch.export matches them: by the names
    `forward` binds the call to. A wrapper's `forward(x, *args, **kwargs)` (fp16's CastWrapper)
    takes three tensors as `x` and a tuple `args`, so a flat tuple of three would not match."""
    import inspect

    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # no Python signature to bind to: the call order it is
        return (*shapes, *[None] * len(kwargs))
    by_name: dict[str, Any] = {}
    position = 0
    for name, value in bound.items():
        kind = parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            by_name[name] = tuple(shapes[position : position + len(value)])
            position += len(value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            by_name[name] = {key: None for key in value}  # constants: never dynamic
        elif position < len(args) and name not in kwargs:
            by_name[name] = shapes[position]
            position += 1
        else:
            by_name[name] = None
    return by_name


def _stretch_dynamic(inputs: ModelInputs, signature: Signature) -> ModelInputs:
    tensors = []
    for tensor, spec in zip(inputs.tensors, signature.inputs):
        for dim in spec.dynamic:
            if dim < tensor.dim() and tensor.shape[dim] < MIN_DYNAMIC_SIZE:
                repeats = [1] * tensor.dim()
                repeats[dim] = MIN_DYNAMIC_SIZE
                tensor = tensor.repeat(*repeats)
        tensors.append(tensor)
    return ModelInputs(tensors, inputs.names, inputs.kwargs)


def _dynamic_names(signature: Signature | None) -> str:
    if signature is None:
        return "[batch]"
    return str({spec.name: list(spec.dynamic) for spec in signature.inputs})


def output_leaves(output: Any, prefix: str = "") -> list[tuple[str, Tensor]]:
    """Every tensor of a (nested) tuple / list / dict output, named by its path ("0", "logits", "1.0")."""
    if isinstance(output, Tensor):
        return [(prefix or "output", output)]
    items: Iterator[tuple[Any, Any]]
    if isinstance(output, dict):
        items = iter(output.items())
    elif isinstance(output, (tuple, list)):
        items = iter(enumerate(output))
    elif hasattr(output, "to_tuple"):  # transformers' ModelOutput
        return output_leaves(dict(output.items()), prefix)
    else:
        return []
    leaves: list[tuple[str, Tensor]] = []
    for key, value in items:
        leaves.extend(output_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return leaves


def select_output(output: Any, selector: OutputSelector = None) -> Tensor:
    """The output scored for accuracy and distillation: by index or key, else the first floating tensor."""
    if isinstance(output, Tensor):
        return output
    if selector is not None:
        try:
            if isinstance(output, dict) or hasattr(output, "keys"):
                chosen = output[selector] if not isinstance(selector, int) else list(output.values())[selector]
            else:
                chosen = output[int(selector)] if isinstance(selector, int) or str(selector).isdigit() else None
        except (KeyError, IndexError, TypeError) as error:
            raise EngineError(
                f"output {selector!r} is not among the model's outputs ({[name for name, _ in output_leaves(output)]})"
            ) from error
        if not isinstance(chosen, Tensor):
            raise EngineError(f"output {selector!r} is a {type(chosen).__name__}, not a tensor")
        return chosen
    for _, leaf in output_leaves(output):
        if leaf.is_floating_point():
            return leaf
    raise EngineError(f"the model's forward returned {type(output).__name__} with no floating-point tensor")


def map_floating(output: Any, function: Any) -> Any:
    """`output` with `function` applied to each floating tensor, keeping its structure."""
    if isinstance(output, Tensor):
        return function(output) if output.is_floating_point() else output
    if isinstance(output, dict):
        return {key: map_floating(value, function) for key, value in output.items()}
    if isinstance(output, tuple):
        return tuple(map_floating(value, function) for value in output)
    if isinstance(output, list):
        return [map_floating(value, function) for value in output]
    return output


def _last_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
