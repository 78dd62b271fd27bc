"""The `sparse_state_dict` artifact: a state_dict of sparse tensors that stock PyTorch loads.

The file is `torch.save(encode_sparse_state_dict(model.state_dict()), path)`. It
holds one tensor per key of the model's state_dict, under the same keys, with
the same shapes:

- a floating-point tensor with two or more dimensions whose sparsity is at least
  `min_sparsity` is stored as a sparse CSR tensor when that is smaller than
  dense. Its index tensors are int32 (half the bytes of torch's default int64).
  * 2-D weights (Linear) are plain CSR: 4 bytes of value + 4 of column index per
    nonzero, so a layer shrinks roughly in proportion to its density once it is
    more than half zeros.
  * N-D weights (Conv) are hybrid CSR: the sparse dims are (out, in) and the
    kernel dims stay dense, so `to_dense()` gives back the full 4-D weight. Only
    kernels that are entirely zero are dropped; an unstructured-sparse conv
    rarely has many of those, and then stays dense (whichever is smaller wins).
- every other tensor (biases, buffers, dense layers) is stored as is.

No side keys, no custom classes: `torch.load(path, weights_only=True)` reads it,
and this is all a user needs to get a model back:

    state = torch.load("model.pt", weights_only=True)
    state = {k: v.to_dense() if v.layout != torch.strided else v for k, v in state.items()}
    model.load_state_dict(state)
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import Tensor, nn

INDEX_DTYPE = torch.int32


def encode_sparse_state_dict(state_dict: Mapping[str, Tensor], min_sparsity: float = 0.3) -> dict[str, Tensor]:
    """Store the sparse weights of `state_dict` as CSR tensors with int32 indices.

    Args:
        state_dict: name -> tensor, as `model.state_dict()` returns it.
        min_sparsity: fraction of zeros below which a weight stays dense.

    Returns:
        A dict with the same keys and shapes; `torch.save` it and load it back with
        `torch.load(path, weights_only=True)`.

    Example:
        >>> torch.save(encode_sparse_state_dict(model.state_dict()), "model.pt")
    """
    return {name: _encode_tensor(_plain(tensor), min_sparsity) for name, tensor in state_dict.items()}


def decode_sparse_state_dict(obj: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Dense tensors with their original shapes from a loaded sparse_state_dict.

    Example:
        >>> model.load_state_dict(decode_sparse_state_dict(torch.load("model.pt", weights_only=True)))
    """
    return {name: tensor.to_dense() if tensor.layout != torch.strided else tensor for name, tensor in obj.items()}


def _plain(tensor: Tensor) -> Tensor:
    # Tensor subclasses (e.g. semi-structured sparse weights on CUDA) do not pass
    # weights_only loading; the artifact keeps their dense values.
    if type(tensor) not in (Tensor, nn.Parameter) and hasattr(tensor, "to_dense"):
        tensor = tensor.to_dense()
    return tensor.detach()


def _encode_tensor(tensor: Tensor, min_sparsity: float) -> Tensor:
    if tensor.layout != torch.strided or not tensor.is_floating_point() or tensor.dim() < 2 or tensor.numel() == 0:
        return tensor
    nonzero = int(torch.count_nonzero(tensor))
    if 1.0 - nonzero / tensor.numel() < min_sparsity:
        return tensor
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        csr = tensor.to_sparse_csr(dense_dim=tensor.dim() - 2)
    values = csr.values()
    if csr.col_indices().numel() >= torch.iinfo(INDEX_DTYPE).max:
        return tensor
    crow = csr.crow_indices().to(INDEX_DTYPE)
    col = csr.col_indices().to(INDEX_DTYPE)
    sparse_bytes = crow.numel() * crow.element_size() + col.numel() * col.element_size() \
        + values.numel() * values.element_size()
    if sparse_bytes >= tensor.numel() * tensor.element_size():
        return tensor
    return torch.sparse_csr_tensor(crow, col, values, tensor.shape, check_invariants=True)
