"""Facts a job report shows beside the measurements: where it ran, and the final model's layers."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

import torch
from torch import nn

_PACKAGES = ("torch", "torchao", "numpy", "onnxruntime", "executorch")


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, CPU and device of the process that measured the job (the worker's sandbox)."""
    versions = {name: version for name in _PACKAGES if (version := _version(name)) is not None}
    facts: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads_default": torch.get_num_threads(),
        "versions": versions,
        "python_implementation": sys.implementation.name,
    }
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
        facts["cuda"] = torch.version.cuda
    return facts


def layer_sparsity(model: nn.Module) -> list[dict[str, Any]]:
    """One row per weight matrix / kernel still held as a float tensor: zeros and size.

    Packed (quantized or codebook) weights are no parameters, so they are absent here;
    their stage's own table describes them.
    """
    rows = []
    for name, tensor in model.named_parameters():
        if not name.endswith("weight") or tensor.dim() < 2 or not tensor.is_floating_point():
            continue
        if type(tensor) not in (torch.Tensor, nn.Parameter):
            continue  # a torchao int8 tensor subclass: quantized, though it reports a float dtype
        numel = tensor.numel()
        zeros = numel - int(torch.count_nonzero(tensor))
        layer = name[: -len(".weight")] if name.endswith(".weight") else name
        rows.append(
            {
                "layer": layer,
                "parameters": numel,
                "sparsity": round(zeros / max(1, numel), 6),
                "shape": list(tensor.shape),
            }
        )
    return rows


def has_recurrent_layers(model: nn.Module) -> bool:
    """LSTM / GRU / RNN layers, eager or as an exported graph's ops (a crash hint and a submit-time refusal depend on it)."""
    if any(isinstance(m, nn.RNNBase) for m in model.modules()):
        return True
    graph = getattr(model, "graph", None)
    nodes = getattr(graph, "nodes", None) or []
    if callable(nodes):  # a TorchScript graph lists its nodes through a method
        nodes = nodes()
    # an exported graph's node names its aten op in `target`; a TorchScript node's text holds its kind
    texts = (str(getattr(node, "target", node)) for node in nodes)
    return any(word in text for text in texts for word in ("lstm", "gru", "rnn_"))
