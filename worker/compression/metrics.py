"""Measurements taken the same way before and after compression."""
from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from worker.compression.base import Dataset

LATENCY_WARMUP = 5
LATENCY_MAX_ITERATIONS = 50
LATENCY_TIME_BUDGET_S = 3.0


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters, nonzero parameters) over floating-point weights and biases.

    Quantized modules keep packed weights that are not parameters; the pipeline
    carries the count of the float model over those stages instead.
    """
    total = nonzero = 0
    seen: set[tuple[Any, ...]] = set()
    for tensor in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
        identity = storage_identity(tensor)  # tied weights (one storage under two names) count once
        if identity in seen or not tensor.is_floating_point():
            continue
        seen.add(identity)
        if tensor.dim() == 0 and not isinstance(tensor, nn.Parameter):
            continue
        total += tensor.numel()
        nonzero += int(torch.count_nonzero(tensor))
    return total, nonzero


def storage_identity(tensor: torch.Tensor) -> tuple[Any, ...]:
    """What makes two tensors the same weight: one storage, offset, shape and stride.

    Tensor subclasses without a storage of their own (torchao's quantized weights) are
    identified by the object."""
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return (id(tensor),)
    if storage.nbytes() == 0:
        return (id(tensor),)
    return (storage.data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)


def measure_latency(model: nn.Module, example_input: torch.Tensor, threads: int) -> dict[str, float]:
    """p50/p95 wall time of one forward pass at the example's batch size."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        timings: list[float] = []
        with torch.inference_mode():
            for _ in range(LATENCY_WARMUP):
                model(example_input)
            started = time.perf_counter()
            while len(timings) < LATENCY_MAX_ITERATIONS and (
                    len(timings) < 10 or time.perf_counter() - started < LATENCY_TIME_BUDGET_S):
                t0 = time.perf_counter()
                model(example_input)
                timings.append((time.perf_counter() - t0) * 1e3)
    finally:
        torch.set_num_threads(previous)
    timings.sort()
    return {"latency_ms_p50": _percentile(timings, 0.5), "latency_ms_p95": _percentile(timings, 0.95)}


def _percentile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return round(sorted_values[index], 4)


# Dynamically quantized models scale activations per batch, so their outputs depend a little on
# how the eval set is batched; the batch size is fixed and reported with the metrics.
EVAL_BATCH_SIZE = 256


def predict(model: nn.Module, inputs: torch.Tensor, batch_size: int = EVAL_BATCH_SIZE) -> torch.Tensor:
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            out = model(inputs[start:start + batch_size])
            outputs.append(out.float() if isinstance(out, torch.Tensor) else out[0].float())
    return torch.cat(outputs)


def accuracy(outputs: torch.Tensor, labels: torch.Tensor | None) -> float | None:
    if labels is None or outputs.dim() != 2:
        return None
    return round(float((outputs.argmax(1) == labels).float().mean()), 6)


def fidelity(reference: torch.Tensor, outputs: torch.Tensor) -> dict[str, float | None]:
    """How closely `outputs` follow the original model's `reference` outputs on the same inputs."""
    reference, outputs = reference.float(), outputs.float()
    error = (reference - outputs).pow(2).mean()
    signal = reference.pow(2).mean()
    sqnr = float("inf") if float(error) == 0 else float(10 * torch.log10(signal / error))
    agreement = None
    if reference.dim() == 2 and reference.shape[1] > 1:
        agreement = round(float((reference.argmax(1) == outputs.argmax(1)).float().mean()), 6)
    return {"top1_agreement": agreement, "output_mse": float(error),
            "sqnr_db": None if math.isinf(sqnr) else round(sqnr, 3)}


def fidelity_inputs(example_input: torch.Tensor, eval_data: Dataset | None, train_data: Dataset | None,
                    limit: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inputs both models are compared on: the whole eval set (accuracy is reported on all of it),
    else up to `limit` training samples, else seeded noise of the example's shape."""
    if eval_data is not None:
        return eval_data.inputs, eval_data.labels
    if train_data is not None:
        return train_data.inputs[:limit], None
    generator = torch.Generator().manual_seed(seed)
    shape = (max(64, example_input.shape[0]),) + tuple(example_input.shape[1:])
    return torch.randn(shape, generator=generator, dtype=example_input.dtype), None


def describe(model: nn.Module, *, size_bytes: int, example_input: torch.Tensor, threads: int,
             outputs: torch.Tensor, labels: torch.Tensor | None,
             parameters: tuple[int, int]) -> dict[str, Any]:
    total, nonzero = parameters
    figures: dict[str, Any] = {
        "size_bytes": size_bytes,
        "parameters": total,
        "nonzero_parameters": nonzero,
        "sparsity": round(1 - nonzero / total, 6) if total else 0.0,
    }
    figures.update(measure_latency(model, example_input, threads))
    figures["accuracy"] = accuracy(outputs, labels)
    return figures
