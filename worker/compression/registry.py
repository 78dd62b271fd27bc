"""Registered architectures: weight-only uploads (state_dict, safetensors) name one.

Built in: `mlp` and `lenet5`. Teams add their own classes through the
`modelpress.architectures` entry-point group of an installed package; import
paths sent over HTTP are never honoured. The public libraries' constructors are
named `torchvision.<model>` (torchvision.models.get_model) and `timm.<model>`
(timm.create_model), always without pretrained weights: nothing is downloaded, the
upload's state_dict is the only source of weights.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from worker.compression.base import EngineError


class MLP(nn.Module):
    """Linear layers with ReLU between them: widths [in, hidden..., out]."""

    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        if len(widths) < 2 or not all(isinstance(w, int) and w > 0 for w in widths):
            raise EngineError("mlp needs widths: a list of at least two positive integers")
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])
        self._register_load_state_dict_pre_hook(_accept_sequential_keys)  # type: ignore[no-untyped-call]  # torch leaves this unannotated

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.net(x.flatten(1))
        return logits


def _accept_sequential_keys(state_dict: dict[str, Any], prefix: str, *rest: Any) -> None:
    """An nn.Sequential of the same layers saves "0.weight"; MLP keeps them under "net."."""
    for key in [k for k in state_dict if k.startswith(prefix) and k[len(prefix) : len(prefix) + 1].isdigit()]:
        state_dict[prefix + "net." + key[len(prefix) :]] = state_dict.pop(key)


class LeNet5(nn.Module):
    """LeNet-5 style CNN for square single-channel images (8x8 digits by default)."""

    def __init__(
        self,
        image_size: int = 8,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: tuple[int, int] | list[int] = (32, 64),
        hidden: int = 128,
    ) -> None:
        super().__init__()
        if image_size % 4:
            raise EngineError("lenet5 needs image_size divisible by 4")
        self.image_size, self.in_channels = image_size, in_channels
        self.c1 = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.c2 = nn.Conv2d(channels[0], channels[1], 3, padding=1)
        self.f1 = nn.Linear(channels[1] * (image_size // 4) ** 2, hidden)
        self.f2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(-1, self.in_channels, self.image_size, self.image_size)
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        logits: Tensor = self.f2(F.relu(self.f1(x.flatten(1))))
        return logits


BUILTIN: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "lenet5": LeNet5}
from modelpress.architectures import ENTRY_POINT_GROUP, is_library_model_name  # noqa: E402


def available_architectures() -> dict[str, Callable[..., nn.Module]]:
    found = dict(BUILTIN)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry.name, entry.load())
    return found


def build_architecture(name: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Instantiate a registered architecture, or a torchvision / timm model, by name.

    Example:
        >>> build_architecture("mlp", {"widths": [64, 32, 10]})
        >>> build_architecture("torchvision.resnet18", {"num_classes": 10})
    """
    library, _, model_name = name.partition(".")
    if model_name and library in LIBRARY_BUILDERS:
        if not is_library_model_name(name):
            raise EngineError(f"{name!r} is not a {library} model name")
        return LIBRARY_BUILDERS[library](model_name, dict(kwargs or {}))
    registry = available_architectures()
    if name not in registry:
        raise EngineError(f"unknown architecture {name!r}; registered: {sorted(registry)}")
    try:
        return registry[name](**(kwargs or {}))
    except TypeError as error:
        raise EngineError(f"architecture {name!r} rejected its kwargs: {error}") from error


# Keyword arguments that would fetch or read weights from somewhere other than the upload.
WEIGHT_SOURCE_KWARGS = frozenset(
    {"weights", "weights_backbone", "pretrained", "pretrained_backbone", "pretrained_cfg", "pretrained_cfg_overlay"}
    | {"checkpoint_path", "pretrained_strict", "cache_dir"}
)


def _refuse_weight_sources(name: str, kwargs: dict[str, Any]) -> None:
    found = sorted(WEIGHT_SOURCE_KWARGS & set(kwargs))
    if found:
        raise EngineError(
            f"architecture {name!r}: {found} would load weights from elsewhere; the uploaded file holds the weights"
        )


def _build_torchvision(model_name: str, kwargs: dict[str, Any]) -> nn.Module:
    import inspect

    from worker.compression.torchvision_ops import import_torchvision

    _refuse_weight_sources(f"torchvision.{model_name}", kwargs)
    models = import_torchvision().models
    try:
        builder = models.get_model_builder(model_name)
    except ValueError as error:
        raise EngineError(
            f"torchvision has no model {model_name!r}; it has {sorted(models.list_models())[:40]}..."
        ) from error
    parameters = inspect.signature(builder).parameters
    # explicit None: some builders (detection) default to downloading a pretrained backbone
    no_weights = {key: None for key in ("weights", "weights_backbone") if key in parameters}
    try:
        module: nn.Module = builder(**no_weights, **kwargs)
    except (TypeError, ValueError) as error:
        raise EngineError(f"torchvision.{model_name} rejected its kwargs: {error}") from error
    return module


def _build_timm(model_name: str, kwargs: dict[str, Any]) -> nn.Module:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from worker.compression.torchvision_ops import import_torchvision

    _refuse_weight_sources(f"timm.{model_name}", kwargs)
    import_torchvision()  # timm imports torchvision
    import timm

    if not timm.is_model(model_name):
        raise EngineError(f"timm has no model {model_name!r} (see timm.list_models())")
    try:
        module: nn.Module = timm.create_model(model_name, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError) as error:
        raise EngineError(f"timm.{model_name} rejected its kwargs: {error}") from error
    return module


def _build_transformers(class_name: str, kwargs: dict[str, Any]) -> nn.Module:
    from worker.compression.huggingface import build_from_config

    config = kwargs.get("config")
    if not isinstance(config, dict) or set(kwargs) != {"config"}:
        raise EngineError(f'architecture "transformers.{class_name}" takes one argument, "config" (an object)')
    return build_from_config(class_name, config)


LIBRARY_BUILDERS: dict[str, Callable[[str, dict[str, Any]], nn.Module]] = {
    "torchvision": _build_torchvision,
    "timm": _build_timm,
    "transformers": _build_transformers,
}
