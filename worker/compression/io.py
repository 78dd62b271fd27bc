"""Loading users' models and writing artifacts that stock PyTorch loads.

Only ever called inside the worker's sandboxed child process: TorchScript and
exported programs are code, and are treated as such.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from worker.compression import breadcrumbs
from worker.compression.archive_check import load_exported_program
from worker.compression.base import Dataset, EngineError, ModelKind
from worker.compression.graph_lift import torch_level_module
from worker.compression.graph_lift_recurrent import has_recurrent_ops
from worker.compression.inputs import (
    Batch,
    ModelInputs,
    Signature,
    as_call,
    call_model,
    export_example,
    export_program,
    export_within_model_bounds,
    output_leaves,
)
from worker.compression.inputs import _last_line as last_line
from worker.compression.registry import build_architecture

# Globals a plain state_dict may reference beyond torch's own weights_only allowlist.
EXTRA_SAFE_GLOBALS: tuple[str, ...] = ("collections.OrderedDict",)
MAX_BATCH = 4096


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """torch.load(weights_only=True) after checking the checkpoint's globals against the allowlist."""
    try:
        referenced = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as error:  # not a torch.save zip archive at all
        raise EngineError(f"not a torch.save checkpoint: {error}") from error
    unsafe = [g for g in referenced if g not in EXTRA_SAFE_GLOBALS]
    if unsafe:
        raise EngineError(f"checkpoint references globals outside the allowlist: {sorted(unsafe)[:5]}")
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # any parse failure is the file's fault
        raise EngineError(f"state_dict could not be loaded with weights_only=True: {error}") from error
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise EngineError("state_dict file must hold a dict of tensors")
    return dict(loaded)


def load_model(path: Path, model_format: str, architecture: dict[str, Any] | None) -> tuple[nn.Module, ModelKind]:
    """Load an uploaded model into a module and say what kind it is."""
    if model_format == "torchscript":
        try:
            return torch.jit.load(str(path), map_location="cpu").eval(), "torchscript"  # type: ignore[no-untyped-call]  # torch leaves this unannotated
        except Exception as error:
            raise EngineError(f"TorchScript archive could not be loaded: {error}") from error
    if model_format == "exported_program":
        return tie_shared_parameters(load_exported_program(path).module()), "graph"
    if model_format == "huggingface":
        from worker.compression.huggingface import load_archive

        return load_archive(path), "eager"
    if model_format in ("state_dict", "safetensors"):
        if not architecture or "name" not in architecture:
            raise EngineError(f"a {model_format} upload needs an architecture from the registry")
        if model_format == "safetensors":
            from safetensors.torch import load_file

            weights = load_file(str(path), device="cpu")
        else:
            weights = load_state_dict_file(path)
        module = build_architecture(architecture["name"], architecture.get("kwargs") or {})
        if architecture["name"].startswith("transformers."):
            from worker.compression.huggingface import load_weights

            load_weights(module, weights, architecture["name"])
            return module.eval(), "eager"
        try:
            module.load_state_dict(weights, strict=True)
        except RuntimeError as error:
            raise EngineError(f"weights do not fit architecture {architecture['name']!r}: {error}") from error
        return module.eval(), "eager"
    raise EngineError(f"unknown model format {model_format!r}")


def tie_shared_parameters(module: nn.Module) -> nn.Module:
    """Make parameters that share one storage the same Parameter object, as in the original model.

    An exported program keeps tied weights (GPT-2's LM head and token embedding) as one
    storage, but `.module()` hands them back as two Parameter objects over it; the first
    deepcopy or in-place replacement would then untie them and every later figure and file
    would count the weight twice. Returns `module`, changed in place.
    """
    first: dict[tuple[Any, ...], nn.Parameter] = {}
    from worker.compression.metrics import storage_identity

    for name, parameter in list(module.named_parameters(remove_duplicate=False)):
        identity = storage_identity(parameter)
        shared = first.setdefault(identity, parameter)
        if shared is not parameter:
            owner_name, _, attribute = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            owner._parameters[attribute] = shared
    return module


def load_dataset(path: Path, signature: Signature | None = None) -> Dataset:
    """Read an .npz (allow_pickle=False) or .safetensors dataset.

    With a declared signature of several inputs (or constant arguments), the arrays named like
    the inputs become one `ModelInputs`, cast to the declared dtypes; a lone `inputs` array
    still means the one positional input.
    """
    with open(path, "rb") as handle:
        magic = handle.read(2)
    if magic == b"PK":
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    else:
        from safetensors.numpy import load_file

        arrays = load_file(str(path))
    inputs: Batch
    if signature is not None and not signature.is_single_tensor and signature.inputs:
        names = signature.names
        if len(names) == 1 and names[0] not in arrays and "inputs" in arrays:
            names_in_file = ["inputs"]
        else:
            names_in_file = names
        missing = [name for name in names_in_file if name not in arrays]
        if missing:
            raise EngineError(
                f"dataset has no array named {missing} (it holds {sorted(arrays)}); name its "
                "arrays like the declared inputs"
            )
        tensors = [
            torch.from_numpy(np.ascontiguousarray(arrays[name])).to(spec.torch_dtype)
            for name, spec in zip(names_in_file, signature.inputs)
        ]
        counts = {int(t.shape[0]) for t in tensors}
        if len(counts) != 1:
            raise EngineError(
                f"dataset inputs have different sample counts: {dict(zip(names, [int(t.shape[0]) for t in tensors]))}"
            )
        inputs = ModelInputs(tensors, names, signature.kwargs)
    else:
        if "inputs" not in arrays:
            raise EngineError("dataset has no 'inputs' array")
        tensor = torch.from_numpy(np.ascontiguousarray(arrays["inputs"]))
        if tensor.is_floating_point():
            tensor = tensor.float()
        inputs = (
            ModelInputs([tensor], ["inputs"], signature.kwargs)
            if signature is not None and signature.kwargs
            else tensor
        )
    labels = arrays.get("labels")
    label_tensor = None
    if labels is not None:
        if not np.issubdtype(labels.dtype, np.integer):
            raise EngineError("dataset 'labels' must be integer class ids")
        if labels.shape[0] != len(inputs):
            raise EngineError(f"dataset has {len(inputs)} inputs but {labels.shape[0]} labels")
        label_tensor = torch.from_numpy(labels.astype(np.int64))
    return Dataset(inputs, label_tensor)


def _dynamic_batch_shapes() -> tuple[dict[int, Any]]:
    return ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)


def _export_batch_dynamic(model: nn.Module, example_input: Batch) -> torch.export.ExportedProgram:
    """One float input: export with a dynamic batch, else (a model that fixes its batch) statically."""
    assert isinstance(example_input, torch.Tensor)
    # torch.export specialises a dimension of size 1; export with two samples so the batch stays dynamic
    if example_input.shape[0] == 1:
        example_input = torch.cat([example_input, example_input])
    breadcrumbs.operation("export: torch.export")
    try:
        return export_within_model_bounds(model, (example_input,), None, _dynamic_batch_shapes())
    except Exception:
        # some models specialise the batch dimension; a static export still loads and runs
        return torch.export.export(model, (example_input,))


def _recurrent_ops_lifted(model: nn.Module) -> nn.Module:
    """`model` with each exported graph in it that calls aten.lstm / aten.gru rebuilt with nn.LSTM / nn.GRU."""
    if has_recurrent_ops(model):
        return torch_level_module(model)
    for name, child in list(model.named_children()):
        setattr(model, name, _recurrent_ops_lifted(child))
    return model


def _with_constant_arguments(traced: nn.Module, names: list[str], constants: dict[str, Any]) -> nn.Module:
    """The traced module (tensors only) behind a scripted forward(tensors..., constants...)."""
    from worker.compression.script_wrapper import check_constants, script_forward

    call = ", ".join(names)
    return script_forward(traced, names, constants, check_constants(constants) + f"        return self.inner({call})\n")


class BoundConstants(nn.Module):
    """`inner(*tensors, **constants)` as a module taking the tensors only (for tracing)."""

    def __init__(self, inner: nn.Module, constants: dict[str, Any]) -> None:
        super().__init__()
        self.inner = inner
        self.constants = dict(constants)

    def forward(self, *tensors: torch.Tensor) -> Any:
        return self.inner(*tensors, **self.constants)


KIND_TO_FORMAT: dict[str, str] = {"eager": "state_dict", "graph": "exported_program", "torchscript": "torchscript"}


def default_output_format(kind: ModelKind, preferred: str | None) -> str:
    """What an artifact is stored as when the job does not say: the stage's preference (the one
    format that can hold its result, e.g. TorchScript for torch.ao's int8 modules), else
    TorchScript for TorchScript models, else an exported program (.pt2): torch.jit is deprecated,
    so eager and exported models download as torch.export output, batch (and declared
    dimensions) dynamic."""
    if preferred:
        return preferred
    return "torchscript" if kind == "torchscript" else "exported_program"


def save_artifact(
    model: nn.Module,
    kind: ModelKind,
    output_format: str,
    path: Path,
    example_input: Batch,
    signature: Signature | None = None,
) -> None:
    """Write `model` to `path` in `output_format`, loadable with stock PyTorch.

    Exported programs are exported with the declared dynamic dimensions (the batch for the
    one-tensor shorthand), so the artifact runs at any batch size and sequence length.
    """
    from worker.compression.training.evaluation import set_training_mode

    set_training_mode(model, False)  # exported-graph modules refuse a plain eval()
    if output_format == "torchscript":
        if kind == "torchscript":
            torch.jit.save(model, str(path))
            return
        if kind == "graph" and any(has_recurrent_ops(module) for module in model.modules()):
            # A trace of aten.lstm records its zero initial state at the example's batch size, and
            # the op does not check it: at another batch the artifact crashed natively (SIGSEGV).
            # nn.LSTM builds that state from its input when it runs.
            model = _recurrent_ops_lifted(copy.deepcopy(model))
        scripted: nn.Module = _trace(model, example_input, signature)
        _, kwargs = as_call(example_input)
        if kwargs:
            assert isinstance(example_input, ModelInputs)  # constants come with named inputs only
            # the artifact is called as the model is, constants included (and checked: they are baked in)
            scripted = _with_constant_arguments(scripted, list(example_input.names), kwargs)
        torch.jit.save(scripted, str(path))
    elif output_format == "exported_program":
        if kind == "torchscript":
            raise EngineError(
                "a TorchScript model cannot be saved as an exported program; use output_format torchscript"
            )
        if signature is None or signature.is_single_tensor:
            program = _export_batch_dynamic(model, example_input)
        else:
            program = export_program(model, signature, example_input)
        with open(path, "wb") as handle:  # a file object: torch.export wants a .pt2 name otherwise
            torch.export.save(program, handle)
    elif output_format == "state_dict":
        # no clone: tied weights share one storage, and torch.save writes a shared storage once
        torch.save(weights_for_saving(model, kind), str(path))
    elif output_format in ("sparse_state_dict", "compact_state_dict"):
        from worker.compression.sparse_format import encode_sparse_state_dict

        compact = output_format == "compact_state_dict"
        torch.save(encode_sparse_state_dict(weights_for_saving(model, kind), compact=compact), str(path))
    elif output_format == "deep_compression":
        if kind == "torchscript":
            raise EngineError(
                "a TorchScript model cannot be saved as a deep_compression container; "
                "upload a state_dict with an architecture"
            )
        from modelpress.deep_compression_format import encode

        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        # NumPy has no bfloat16: such tensors are stored as the float32 they widen to exactly
        arrays = {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()}
        path.write_bytes(encode(arrays)[0])
    else:
        raise EngineError(f"unknown output format {output_format!r}")


def _trace(model: nn.Module, example_input: Batch, signature: Signature | None) -> torch.jit.ScriptModule:
    """`model` traced to TorchScript on an example whose declared dynamic dimensions are >= 2,
    checked on `example_input` (another size) against the model itself.

    A trace records the sizes it saw wherever code turns them into plain numbers; at size 1
    that includes code that tests for 1 (Hugging Face's mask building picks another path for one
    sequence, indexed by the batch), so the trace is made at size 2 and run once at the other size.
    """
    example = export_example(signature, example_input)
    args, kwargs = as_call(example)
    with torch.no_grad():
        try:
            # tracing records one path through the code: constant arguments are baked in
            traced = BoundConstants(model, kwargs) if kwargs else model
            # strict=False: tuple / dict outputs (Hugging Face models) are traced as they are
            scripted: torch.jit.ScriptModule = torch.jit.trace(traced, args, check_trace=False, strict=False)  # type: ignore[no-untyped-call]  # torch leaves this unannotated
        except Exception as error:
            raise EngineError(f"the model could not be saved as TorchScript: {error}") from error
        if _shapes(example_input) != _shapes(example):
            _check_trace_generalizes(model, scripted, example_input, len(example))
    return scripted


def _check_trace_generalizes(
    model: nn.Module, scripted: torch.jit.ScriptModule, other: Batch, traced_batch: int
) -> None:
    args, kwargs = as_call(other)
    try:
        expected, got = call_model(model, other), scripted(*args)
        mismatch = _first_mismatch(output_leaves(expected), output_leaves(got))
    except Exception as error:
        mismatch = last_line(error)
    if mismatch:
        raise EngineError(
            f"the TorchScript trace of this model (made at batch {traced_batch}) does not run at batch "
            f"{len(other)}: {mismatch}; the model turns its input sizes into constants that torch.jit.trace "
            'bakes in, so choose output_format "exported_program" or a scheme that can write one'
        )


def _first_mismatch(expected: list[tuple[str, torch.Tensor]], got: list[tuple[str, torch.Tensor]]) -> str | None:
    if len(expected) != len(got):
        return f"it returns {len(got)} tensors instead of {len(expected)}"
    for (name, a), (_, b) in zip(expected, got):
        if a.shape != b.shape:
            return f"output {name} has shape {list(b.shape)} instead of {list(a.shape)}"
        scale = float(a.float().abs().max()) if a.numel() else 0.0
        if not torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-3 * scale):
            return f"output {name} differs from the model's"
    return None


def _shapes(inputs: Batch) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in as_call(inputs)[0]]


def weights_for_saving(model: nn.Module, kind: ModelKind) -> dict[str, torch.Tensor]:
    """The model's state_dict as the user's own eager model holds it.

    TorchScript forgets which buffers were registered `persistent=False`, so its state_dict
    carries index buffers an eager model's does not (Hugging Face's `position_ids`,
    `token_type_ids`), and `load_state_dict` would refuse them as unexpected keys. Integer
    buffers holding only a recomputable constant (all zeros, or 0..n-1 along the last
    axis) are those; they are left out. Batch norms' `num_batches_tracked` stays.
    """
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if kind != "torchscript":
        return state
    buffers = {name for name, _ in model.named_buffers()}
    return {k: v for k, v in state.items() if not (k in buffers and _is_index_constant(k, v))}


def _is_index_constant(name: str, tensor: torch.Tensor) -> bool:
    if (
        tensor.is_floating_point()
        or tensor.dtype == torch.bool
        or tensor.dim() == 0
        or name.endswith("num_batches_tracked")
    ):
        return False
    if not bool((tensor == 0).all()):
        positions = torch.arange(tensor.shape[-1], dtype=tensor.dtype)
        return bool((tensor == positions).all())
    return True


def load_artifact(path: Path, artifact_format: str) -> nn.Module | dict[str, torch.Tensor]:
    """Load an artifact the way the README tells users to."""
    if artifact_format == "torchscript":
        scripted: nn.Module = torch.jit.load(str(path))  # type: ignore[no-untyped-call]  # torch leaves this unannotated
        return scripted
    if artifact_format == "exported_program":
        return load_exported_program(path).module()
    if artifact_format == "deep_compression":
        from modelpress.deep_compression_format import load_state_dict

        return load_state_dict(path)
    state_dict: dict[str, torch.Tensor] = torch.load(str(path), weights_only=True)
    return state_dict
