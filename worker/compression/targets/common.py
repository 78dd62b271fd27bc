"""Small helpers shared by the target runtimes."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def as_eval(model: nn.Module) -> nn.Module:
    """`model.eval()`; an exported program's module refuses eval() and is already frozen in its mode."""
    try:
        return model.eval()
    except NotImplementedError:
        return model


def run_in_chunks(run: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, batch: int | None) -> torch.Tensor:
    """`run` over `inputs`; with a static `batch`, in chunks of it, the last padded and trimmed."""
    if batch is None:
        return run(inputs)
    outputs = []
    for start in range(0, len(inputs), batch):
        chunk = inputs[start : start + batch]
        real = len(chunk)
        if real < batch:
            chunk = torch.cat([chunk, chunk[-1:].expand(batch - real, *chunk.shape[1:])])
        outputs.append(run(chunk)[:real])
    return torch.cat(outputs)
