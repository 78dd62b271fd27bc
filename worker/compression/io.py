"""Loading users' models and writing artifacts that stock PyTorch loads.

Only ever called inside the worker's sandboxed child process: TorchScript and
exported programs are code, and are treated as such.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from worker.compression.archive_check import load_exported_program
from worker.compression.base import Dataset, EngineError, ModelKind
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
            return torch.jit.load(str(path), map_location="cpu").eval(), "torchscript"
        except Exception as error:
            raise EngineError(f"TorchScript archive could not be loaded: {error}") from error
    if model_format == "exported_program":
        return load_exported_program(path).module(), "graph"
    if model_format in ("state_dict", "safetensors"):
        if not architecture or "name" not in architecture:
            raise EngineError(f"a {model_format} upload needs an architecture from the registry")
        if model_format == "safetensors":
            from safetensors.torch import load_file

            weights = load_file(str(path), device="cpu")
        else:
            weights = load_state_dict_file(path)
        module = build_architecture(architecture["name"], architecture.get("kwargs") or {})
        try:
            module.load_state_dict(weights, strict=True)
        except RuntimeError as error:
            raise EngineError(f"weights do not fit architecture {architecture['name']!r}: {error}") from error
        return module.eval(), "eager"
    raise EngineError(f"unknown model format {model_format!r}")


def load_dataset(path: Path) -> Dataset:
    """Read an .npz (allow_pickle=False) or .safetensors dataset."""
    with open(path, "rb") as handle:
        magic = handle.read(2)
    if magic == b"PK":
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    else:
        from safetensors.numpy import load_file

        arrays = load_file(str(path))
    if "inputs" not in arrays:
        raise EngineError("dataset has no 'inputs' array")
    inputs = torch.from_numpy(np.ascontiguousarray(arrays["inputs"]))
    if inputs.is_floating_point():
        inputs = inputs.float()
    labels = arrays.get("labels")
    label_tensor = None
    if labels is not None:
        if not np.issubdtype(labels.dtype, np.integer):
            raise EngineError("dataset 'labels' must be integer class ids")
        if labels.shape[0] != inputs.shape[0]:
            raise EngineError(f"dataset has {inputs.shape[0]} inputs but {labels.shape[0]} labels")
        label_tensor = torch.from_numpy(labels.astype(np.int64))
    return Dataset(inputs, label_tensor)


def _dynamic_batch_shapes() -> tuple[dict[int, Any]]:
    return ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)


KIND_TO_FORMAT: dict[str, str] = {"eager": "state_dict", "graph": "exported_program", "torchscript": "torchscript"}


def default_output_format(kind: ModelKind, preferred: str | None) -> str:
    """What an artifact is stored as when the job does not say: the stage's preference, else
    an exported program for exported inputs, else TorchScript."""
    if preferred:
        return preferred
    return "exported_program" if kind == "graph" else "torchscript"


def save_artifact(model: nn.Module, kind: ModelKind, output_format: str, path: Path,
                  example_input: torch.Tensor) -> None:
    """Write `model` to `path` in `output_format`, loadable with stock PyTorch."""
    model.eval()
    if output_format == "torchscript":
        if kind == "torchscript":
            torch.jit.save(model, str(path))
            return
        with torch.no_grad():
            try:
                scripted = torch.jit.trace(model, example_input, check_trace=False)
            except Exception as error:
                raise EngineError(f"the model could not be saved as TorchScript: {error}") from error
        torch.jit.save(scripted, str(path))
    elif output_format == "exported_program":
        if kind == "torchscript":
            raise EngineError("a TorchScript model cannot be saved as an exported program; use output_format torchscript")
        # torch.export specialises a dimension of size 1; export with two samples so the batch stays dynamic
        if example_input.shape[0] == 1:
            example_input = torch.cat([example_input, example_input])
        try:
            program = torch.export.export(model, (example_input,), dynamic_shapes=_dynamic_batch_shapes())
        except Exception:
            # some models specialise the batch dimension; a static export still loads and runs
            program = torch.export.export(model, (example_input,))
        with open(path, "wb") as handle:  # a file object: torch.export wants a .pt2 name otherwise
            torch.export.save(program, handle)
    elif output_format == "state_dict":
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, str(path))
    elif output_format == "sparse_state_dict":
        from worker.compression.sparse_format import encode_sparse_state_dict

        torch.save(encode_sparse_state_dict({k: v.detach() for k, v in model.state_dict().items()}), str(path))
    elif output_format == "deep_compression":
        if kind == "torchscript":
            raise EngineError("a TorchScript model cannot be saved as a deep_compression container; "
                              "upload a state_dict with an architecture")
        from modelpress.deep_compression_format import encode

        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        # NumPy has no bfloat16: such tensors are stored as the float32 they widen to exactly
        arrays = {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()}
        path.write_bytes(encode(arrays)[0])
    else:
        raise EngineError(f"unknown output format {output_format!r}")


def load_artifact(path: Path, artifact_format: str) -> nn.Module | dict[str, torch.Tensor]:
    """Load an artifact the way the README tells users to."""
    if artifact_format == "torchscript":
        return torch.jit.load(str(path))
    if artifact_format == "exported_program":
        return load_exported_program(path).module()
    if artifact_format == "deep_compression":
        from modelpress.deep_compression_format import load_state_dict

        return load_state_dict(path)
    return torch.load(str(path), weights_only=True)
