"""Small helpers shared by the target runtimes."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from worker.compression.inputs import Batch, ModelInputs


def as_eval(model: nn.Module) -> nn.Module:
    """`model.eval()`; an exported program's module refuses eval() and is already frozen in its mode."""
    try:
        return model.eval()
    except NotImplementedError:
        return model


def run_in_chunks(run: Callable[[Batch], torch.Tensor], inputs: Batch, batch: int | None) -> torch.Tensor:
    """`run` over `inputs`; with a static `batch`, in chunks of it, the last padded and trimmed."""
    if batch is None:
        return run(inputs)
    outputs = []
    for start in range(0, len(inputs), batch):
        chunk = inputs[start : start + batch]
        real = len(chunk)
        if real < batch:
            chunk = _pad_with_last(chunk, batch)
        outputs.append(run(chunk)[:real])
    return torch.cat(outputs)


def _pad_with_last(chunk: Batch, batch: int) -> Batch:
    def pad(tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor, tensor[-1:].expand(batch - len(tensor), *tensor.shape[1:])])

    if isinstance(chunk, ModelInputs):
        return ModelInputs([pad(t) for t in chunk.tensors], chunk.names, chunk.kwargs)
    return pad(chunk)
