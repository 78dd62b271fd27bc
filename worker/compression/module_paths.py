"""Reading and placing submodules and tensors by dotted path ("blocks.0.attn.weight") in a module tree."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def fetch(source: nn.Module, target: str) -> Any:
    value: Any = source
    for part in target.split("."):
        value = getattr(value, part)
    return value


def has_submodule(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def set_path(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = ensure_module(root, parent_path)
    parent.add_module(leaf, module)


def ensure_module(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split(".") if path else []:
        child = module._modules.get(part)
        if child is None:
            child = nn.Module()
            module.add_module(part, child)
        module = child
    return module


def copy_attribute(source: nn.Module, root: nn.Module, target: str) -> None:
    parent_path, _, leaf = target.rpartition(".")
    parent = ensure_module(root, parent_path)
    if leaf in parent._parameters or leaf in parent._buffers or leaf in parent.__dict__:
        return
    value = fetch(source, target)
    if isinstance(value, nn.Parameter):
        parent.register_parameter(leaf, value)
    elif isinstance(value, torch.Tensor):
        parent.register_buffer(leaf, value)
    else:
        setattr(parent, leaf, value)
