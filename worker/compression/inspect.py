"""What an uploaded model is: parameters, layer types, input signature when known."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch

from worker.compression.base import EngineError
from worker.compression.facts import has_recurrent_layers
from worker.compression.inputs import Signature, make_example
from worker.compression.io import load_model
from worker.compression.metrics import count_parameters
from worker.compression.torchscript_conversion import torchscript_to_graph


def inspect_model(
    path: Path, model_format: str, architecture: dict[str, Any] | None, inputs: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
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
        graph = model.graph
        assert isinstance(graph, torch.fx.Graph)
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        signature = [
            {"name": n.name, "shape": [str(d) for d in n.meta["val"].shape], "dtype": str(n.meta["val"].dtype)}
            for n in placeholders
            if "val" in n.meta and isinstance(n.meta["val"], torch.Tensor)
        ]
    output_shape = _graph_output_shape(model, signature) if kind == "graph" else None
    found = {
        "kind": kind,
        "output_shape": output_shape,
        "parameters": parameters,
        "nonzero_parameters": nonzero,
        "layer_types": dict(layer_types.most_common(30)),
        "input_signature": signature,
    }
    if kind == "graph":
        # torch's int8 kernels crash natively on an exported graph's LSTM / GRU ops (SIGBUS, SIGABRT
        # "corrupted double-linked list"): the API refuses int8 of such a graph at submit
        found["recurrent_graph"] = has_recurrent_layers(model)
    if kind == "torchscript" and inputs:
        found.update(_try_graph_conversion(model, inputs))
    from worker.compression.huggingface import declared_inputs, is_transformers_upload

    if is_transformers_upload(model_format, architecture):
        # the worker records these as the model's inputs when the upload declared none
        found["declared_inputs"] = declared_inputs(model)
        found["model_class"] = type(model).__name__
    return found


def _try_graph_conversion(model: torch.nn.Module, inputs: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether torch's TorchScript converter turns the model into an exported program, which the
    eager-only schemes need; the API refuses those schemes at submit, naming the reason, when not."""
    signature = Signature.from_request(inputs, None)
    assert signature is not None
    try:
        torchscript_to_graph(model, signature, make_example(signature, seed=0))
    except EngineError as error:
        return {"graph_conversion": False, "graph_conversion_error": str(error)[:1000]}
    except Exception as error:  # the model does not even run on its declared inputs: the job says so
        return {"graph_conversion": False, "graph_conversion_error": f"{type(error).__name__}: {str(error)[:800]}"}
    return {"graph_conversion": True}


def _graph_output_shape(model: torch.nn.Module, signature: Any) -> list[int] | None:
    """Run an exported program once on zeros of its input signature (dynamic sizes as 2)."""
    if not signature or len(signature) != 1:
        return None
    entry = signature[0]
    shape = [int(d) if d.isdigit() else 2 for d in entry["shape"]]
    dtype = getattr(torch, entry["dtype"].replace("torch.", ""), torch.float32)
    try:
        with torch.inference_mode():
            out = model(torch.zeros(shape, dtype=dtype))
    except Exception:  # the job itself will say why the model does not run
        return None
    return list(out.shape) if isinstance(out, torch.Tensor) else None
