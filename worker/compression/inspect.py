"""What an uploaded model is: parameters, layer types, input signature when known."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch

from worker.compression.io import load_model
from worker.compression.metrics import count_parameters


def inspect_model(path: Path, model_format: str, architecture: dict[str, Any] | None) -> dict[str, Any]:
    model, kind = load_model(path, model_format, architecture)
    parameters, nonzero = count_parameters(model)
    layer_types: Counter[str] = Counter()
    for _, module in model.named_modules():
        name = getattr(module, "original_name", None) or type(module).__name__
        layer_types[name] += 1
    signature: Any = None
    if kind == "torchscript":
        signature = str(model.forward.schema) if hasattr(model.forward, "schema") else None
    elif kind == "graph":
        placeholders = [n for n in model.graph.nodes if n.op == "placeholder"]
        signature = [{"name": n.name, "shape": [str(d) for d in n.meta["val"].shape],
                      "dtype": str(n.meta["val"].dtype)} for n in placeholders if "val" in n.meta
                     and isinstance(n.meta["val"], torch.Tensor)]
    return {"kind": kind, "parameters": parameters, "nonzero_parameters": nonzero,
            "layer_types": dict(layer_types.most_common(30)), "input_signature": signature}
