"""Layer selection for quantization: which layers a scheme targets, what a backend hands back,
and the checks and helpers every backend shares."""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from worker.compression.base import EngineError, ModelKind

# --------------------------------------------------------------------------- layer selection


@dataclass
class LayerPlan:
    """The candidate layers of a scheme split into those to quantize and those left alone."""

    targets: list[str]
    skipped: list[str]
    # layer name -> why the backend cannot change it (reported, not an error)
    left_float: dict[str, str] = field(default_factory=dict)


@dataclass
class _Done:
    """What a backend hands back to `run_stage`."""

    model: nn.Module
    kind: ModelKind
    plan: LayerPlan
    info: dict[str, Any] = field(default_factory=dict)


def plan_layers(candidates: Sequence[str], options: dict[str, Any]) -> LayerPlan:
    """Split `candidates` (module names, in definition order) by skip_layers and keep_first_last_float.

    Example:
        >>> plan_layers(["fc1", "fc2", "fc3"], {"skip_layers": ["fc2"], "keep_first_last_float": False})
        LayerPlan(targets=['fc1', 'fc3'], skipped=['fc2'], left_float={})
    """
    patterns = list(options.get("skip_layers") or [])
    ends = {candidates[0], candidates[-1]} if candidates and options.get("keep_first_last_float") else set()
    skipped = [
        name for name in candidates if name in ends or any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
    ]
    return LayerPlan(targets=[name for name in candidates if name not in skipped], skipped=skipped)


def _require_targets(plan: LayerPlan, candidates: Sequence[str], what: str, scheme: str) -> None:
    if not candidates:
        raise EngineError(f"{scheme} found no {what} in this model, so it would change nothing")
    if not plan.targets:
        raise EngineError(
            f"{scheme}: all {len(candidates)} {what} ({', '.join(candidates)}) are excluded by "
            "skip_layers / keep_first_last_float, so the stage would change nothing"
        )


def _is_quantized_module(module: nn.Module) -> bool:
    return type(module).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized"))


def _check_swapped(model: nn.Module, plan: LayerPlan, scheme: str) -> None:
    modules = dict(model.named_modules())
    _keep_changed(
        plan,
        lambda name: name in modules and _is_quantized_module(modules[name]),
        "the backend left it in float (its pattern is not quantizable here)",
        scheme,
    )


def _keep_changed(plan: LayerPlan, changed: Callable[[str], bool], reason: str, scheme: str) -> None:
    """Move targets the backend did not change to `left_float`; fail if none changed."""
    for name in list(plan.targets):
        if not changed(name):
            plan.targets.remove(name)
            plan.left_float[name] = reason
    if not plan.targets:
        raise EngineError(f"{scheme} changed no layer: " + "; ".join(f"{k}: {v}" for k, v in plan.left_float.items()))


def _model_device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


@contextmanager
def _quiet_deprecations() -> Iterator[None]:
    # torch.ao warns on every call that it is moving to torchao; the table below is where that move happens.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*")
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        warnings.filterwarnings("ignore", message=".*grad attribute of a Tensor that is not a leaf.*")
        warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
        yield
