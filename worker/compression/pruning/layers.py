"""Which layers pruning chooses, and small helpers the pruning modules share."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from worker.compression.base import EngineError, select_layers

Layer = tuple[str, nn.Module]


# ---------------------------------------------------------------- helpers


def _chosen_layers(model: nn.Module, options: dict[str, Any]) -> list[Layer]:
    layers = select_layers(model, options.get("layers"), include_classifier=bool(options.get("prune_classifier")))
    if not layers:
        names = [name for name, _ in _matrix_layers(model)]
        raise EngineError(
            f"the layer patterns {options.get('layers')} match no prunable layer; layers with "
            f"weights are {names[:20]} (the last is the classifier, left alone unless "
            f"prune_classifier is true)"
        )
    return layers


def _matrix_layers(model: nn.Module) -> list[Layer]:
    return select_layers(model, None, include_classifier=True)


def _weight(module: nn.Module) -> Tensor:
    weight = module.weight
    assert isinstance(weight, Tensor)
    return weight


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _last_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__
