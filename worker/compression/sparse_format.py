"""Pruned state_dict artifacts whose zeros cost less than dense weights, loadable with stock torch.

Two output formats, both `torch.save(encode_sparse_state_dict(state, compact=...), path)`
with one entry per key of the model's state_dict, under the same keys:

`sparse_state_dict` (the default after unstructured / N:M pruning): every entry is a plain
torch tensor, dense or a sparse CSR tensor with int32 indices (N-D weights as hybrid CSR
over (out, in) with dense kernels), whichever is smaller, so the one-liner

    state = {k: v.to_dense() if v.layout != torch.strided else v for k, v in state.items()}

loads it. CSR costs 8 bytes per kept float32 weight: it only pays off above about 50%
sparsity.

`compact_state_dict` (on request): each floating-point weight is stored in whichever of
these is smallest for it, measured in bytes:

- dense, or CSR as above;
- bitmask: {"encoding": "bitmask", "shape": [...], "mask": uint8 bits (1 = kept, first
  element in the lowest bit), "values": the kept values in row-major order}: one bit per
  weight plus the kept values, smaller than dense from about 3% zeros on;
- relative: {"encoding": "relative", "shape": [...], "gaps": uint8 or int16 distances from
  one stored position to the next (the first counted from -1), "values": ...}: Han et
  al.'s relative indexing, where a gap longer than the index type holds is bridged by
  stored zeros; the smallest at high sparsity.

Everything else (biases, buffers, integer tensors) is stored as is. No custom classes:
`torch.load(path, weights_only=True)` reads both, and `decode_sparse_state_dict` below (the
README prints it, stock torch only) gives back dense tensors with their original shapes.
Tied weights (one tensor under two keys) are encoded and stored once.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from worker.compression.metrics import storage_identity

INDEX_DTYPE = torch.int32
# torch.save keeps each tensor's storage as a zip entry of its own, with headers and 64-byte
# alignment: an encoding made of several tensors pays this much per extra tensor.
STORAGE_OVERHEAD_BYTES = 192
RELATIVE_GAP_DTYPES = (torch.uint8, torch.int16)


def encode_sparse_state_dict(
    state_dict: Mapping[str, Tensor], min_sparsity: float = 0.0, *, compact: bool = False
) -> dict[str, Any]:
    """Store each floating-point weight of `state_dict` in its smallest encoding.

    Args:
        state_dict: name -> tensor, as `model.state_dict()` returns it.
        min_sparsity: fraction of zeros below which a weight stays dense whatever it costs.
        compact: also consider the bitmask and relative-index encodings (`compact_state_dict`);
            without it every entry is a dense or CSR tensor (`sparse_state_dict`).

    Returns:
        A dict with the same keys; `torch.save` it, load it back with
        `torch.load(path, weights_only=True)` and `decode_sparse_state_dict`.

    Example:
        >>> torch.save(encode_sparse_state_dict(model.state_dict()), "model.pt")
    """
    encoded: dict[str, Any] = {}
    # Tied weights (one tensor under two keys) are encoded once and share the stored object,
    # which torch.save writes once.
    seen: dict[tuple[Any, ...], Any] = {}
    for name, tensor in state_dict.items():
        plain = _plain(tensor)
        identity = storage_identity(plain) if plain.layout == torch.strided else (id(plain),)
        if identity not in seen:
            seen[identity] = _encode_tensor(plain, min_sparsity, compact)
        encoded[name] = seen[identity]
    return encoded


def decode_sparse_state_dict(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """Dense tensors with their original shapes from a loaded sparse_state_dict (the README's code).

    Example:
        >>> model.load_state_dict(decode_sparse_state_dict(torch.load("model.pt", weights_only=True)))
    """
    dense = {}
    for key, value in state.items():
        if isinstance(value, dict):  # "bitmask" or "relative"
            flat = torch.zeros(math.prod(value["shape"]), dtype=value["values"].dtype)
            if value["encoding"] == "bitmask":
                bits = (value["mask"].unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1
                flat[bits.flatten()[: flat.numel()].bool()] = value["values"]
            else:
                flat[torch.cumsum(value["gaps"].long(), 0) - 1] = value["values"]
            value = flat.reshape(value["shape"])
        elif value.layout != torch.strided:  # CSR
            value = value.to_dense()
        dense[key] = value
    return dense


def encoded_bytes(value: Tensor | dict[str, Any]) -> int:
    """Bytes of tensor data (plus per-tensor storage overhead) an encoded entry takes in the file."""
    if isinstance(value, dict):
        tensors = [v for v in value.values() if isinstance(v, Tensor)]
        return sum(_tensor_bytes(t) for t in tensors) + STORAGE_OVERHEAD_BYTES * (len(tensors) - 1)
    if value.layout == torch.sparse_csr:
        parts = (value.crow_indices(), value.col_indices(), value.values())
        return sum(_tensor_bytes(t) for t in parts) + STORAGE_OVERHEAD_BYTES * 2
    return _tensor_bytes(value)


def _tensor_bytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _plain(tensor: Tensor) -> Tensor:
    # Tensor subclasses (e.g. semi-structured sparse weights on CUDA) do not pass
    # weights_only loading; the artifact keeps their dense values.
    if type(tensor) not in (Tensor, nn.Parameter) and hasattr(tensor, "to_dense"):
        tensor = tensor.to_dense()
    return tensor.detach()


def _encode_tensor(tensor: Tensor, min_sparsity: float, compact: bool) -> Tensor | dict[str, Any]:
    if tensor.layout != torch.strided or not tensor.is_floating_point() or tensor.dim() < 2 or tensor.numel() == 0:
        return tensor
    nonzero = int(torch.count_nonzero(tensor))
    if 1.0 - nonzero / tensor.numel() < max(min_sparsity, 1e-12):
        return tensor
    tensor = tensor.contiguous()
    options: list[Tensor | dict[str, Any]] = [tensor]
    csr = _csr(tensor)
    if csr is not None:
        options.append(csr)
    if compact:
        options.append(_bitmask(tensor))
        options += [encoded for dtype in RELATIVE_GAP_DTYPES if (encoded := _relative(tensor, dtype)) is not None]
    return min(options, key=encoded_bytes)  # dense first: it wins ties


def _bitmask(tensor: Tensor) -> dict[str, Any]:
    flat = tensor.flatten()
    kept = flat != 0
    padded = torch.zeros(math.ceil(flat.numel() / 8) * 8, dtype=torch.uint8)
    padded[: flat.numel()] = kept.to(torch.uint8)
    weights = (2 ** torch.arange(8, dtype=torch.int32)).to(torch.uint8)
    mask = (padded.view(-1, 8) * weights).sum(1, dtype=torch.int32).to(torch.uint8)
    return {"encoding": "bitmask", "shape": list(tensor.shape), "mask": mask, "values": flat[kept].clone()}


def _relative(tensor: Tensor, dtype: torch.dtype) -> dict[str, Any] | None:
    flat = tensor.flatten()
    positions = torch.nonzero(flat).flatten()
    if positions.numel() == 0:
        return None
    longest = int(torch.iinfo(dtype).max)
    gaps = torch.diff(positions, prepend=torch.tensor([-1]))
    # a gap longer than the index type holds is bridged by stored zeros every `longest` positions
    steps = (gaps + longest - 1) // longest
    if int(steps.sum()) > flat.numel():
        return None
    ends = torch.cumsum(steps, 0) - 1
    out_gaps = torch.full((int(steps.sum()),), longest, dtype=torch.int64)
    out_gaps[ends] = gaps - (steps - 1) * longest
    values = torch.zeros(int(steps.sum()), dtype=flat.dtype)
    values[ends] = flat[positions]
    return {"encoding": "relative", "shape": list(tensor.shape), "gaps": out_gaps.to(dtype), "values": values}


def _csr(tensor: Tensor) -> Tensor | None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        csr = tensor.to_sparse_csr(dense_dim=tensor.dim() - 2)
    values = csr.values()
    if csr.col_indices().numel() >= torch.iinfo(INDEX_DTYPE).max:
        return None
    crow = csr.crow_indices().to(INDEX_DTYPE)
    col = csr.col_indices().to(INDEX_DTYPE)
    return torch.sparse_csr_tensor(crow, col, values, tensor.shape, check_invariants=True)
