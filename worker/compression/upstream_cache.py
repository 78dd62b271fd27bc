"""Skip the part of a model that a change to one layer cannot reach.

When only layer L differs from the float model, every module that finished before L was first
called computes what it computed in the float run (eval mode: no dropout, no state). Sensitivity
analysis changes one layer at a time, so it records those modules' outputs once on the probe inputs
and, while L is probed, puts in their place modules that hand the recorded outputs back. On a 6-layer
BERT that skips the embeddings and the blocks before L: about half of every probe's forward pass.

The cache checks itself once: with every module before the last probed layer replayed, the model
must reproduce the float outputs exactly, or it is not used.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from worker.compression import metrics as measure
from worker.compression.inputs import Batch, call_model


class _Replay(nn.Module):
    """Stands in for a module: returns (a copy of) what it returned in the float run."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return _copied(self.output)  # a copy: the caller may add to it in place (x += residual)


def _copied(value: Any) -> Any:
    return tree_map(lambda leaf: leaf.clone() if isinstance(leaf, torch.Tensor) else leaf, value)


@dataclass
class UpstreamCache:
    """The float run's outputs of the modules that finish before each probed layer starts."""

    root: nn.Module
    # probed layer -> names of the modules that finished before it was first called, outermost only
    before: dict[str, list[str]] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def record(cls, model: nn.Module, inputs: Batch, layers: Sequence[str]) -> UpstreamCache | None:
        """Record the cache for probing `layers` on `inputs` (one batch); None when it cannot be used."""
        if len(inputs) > measure.EVAL_BATCH_SIZE:
            return None  # predict() would split the probe and the recorded outputs would not line up
        start, end, calls = _call_order(model, inputs[:1])
        cache = cls(model)
        children = {
            name: [f"{name}.{c}" if name else c for c, _ in module.named_children()]
            for name, module in model.named_modules()
        }
        for layer in layers:
            if layer not in start:
                continue
            ancestors = [""] + [layer.rsplit(".", depth)[0] for depth in range(layer.count("."), 0, -1)]
            cache.before[layer] = [
                child
                for ancestor in ancestors
                for child in children.get(ancestor, [])
                if calls.get(child) == 1 and end[child] < start[layer]
            ]
        needed = {name for names in cache.before.values() for name in names}
        cache.outputs = _record_outputs(model, inputs, needed)
        last = max(cache.before, key=lambda layer: start[layer], default=None)
        if last is None or not cache.before[last]:
            return None
        reference = measure.predict(model, inputs)
        with cache.skipping_before(last):
            replayed = measure.predict(model, inputs)
        if set(replayed) != set(reference) or any(not torch.equal(reference[k], replayed[k]) for k in reference):
            return None
        return cache

    @contextmanager
    def skipping_before(self, layer: str) -> Iterator[None]:
        """The modules that finish before `layer` is called hand back their recorded outputs."""
        replaced: list[tuple[nn.Module, str, nn.Module]] = []
        try:
            for name in self.before.get(layer, []):
                parent_name, _, leaf = name.rpartition(".")
                parent = self.root.get_submodule(parent_name) if parent_name else self.root
                replaced.append((parent, leaf, getattr(parent, leaf)))
                setattr(parent, leaf, _Replay(self.outputs[name]))
            yield
        finally:
            for parent, leaf, original in reversed(replaced):
                setattr(parent, leaf, original)


def _call_order(model: nn.Module, inputs: Batch) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """Per module: the step its first call starts and ends at, and how many times it is called."""
    start: dict[str, int] = {}
    end: dict[str, int] = {}
    calls: dict[str, int] = {}
    clock = [0]

    def before(name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            clock[0] += 1
            start.setdefault(name, clock[0])
            calls[name] = calls.get(name, 0) + 1

        return hook

    def after(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            clock[0] += 1
            end.setdefault(name, clock[0])

        return hook

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(before(name)))
        handles.append(module.register_forward_hook(after(name)))
    try:
        with torch.inference_mode():
            call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return start, end, calls


def _record_outputs(model: nn.Module, inputs: Batch, names: set[str]) -> dict[str, Any]:
    outputs: dict[str, Any] = {}

    def keep(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            outputs[name] = _copied(output)  # a copy: the model may change its output in place later

        return hook

    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(keep(name)) for name in names]
    try:
        with torch.inference_mode():
            call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return outputs
