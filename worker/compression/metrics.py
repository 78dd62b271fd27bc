"""Measurements taken the same way before and after compression."""
from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable
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
    seen: set[int] = set()
    for tensor in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
        if id(tensor) in seen or not tensor.is_floating_point():
            continue
        seen.add(id(tensor))
        if tensor.dim() == 0 and not isinstance(tensor, nn.Parameter):
            continue
        total += tensor.numel()
        nonzero += int(torch.count_nonzero(tensor))
    return total, nonzero


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


# Before/after speed is measured interleaved: rounds that each time a few calls of one model and then of the
# other (the order alternating), so load that drifts on a shared machine hits both alike. Each round gives one
# ratio; the speedup is their median, its spread a bootstrap interval of that median.
SPEED_MIN_ROUNDS = 10
SPEED_MAX_ROUNDS = 40
SPEED_MAX_CALLS_PER_ROUND = 5
SPEED_TIME_BUDGET_S = 3.0
SPEED_CONFIDENCE = 0.95
SPEED_BOOTSTRAP_SAMPLES = 2000
# A change smaller than this is not called faster or slower even when it is consistent: on a shared CPU,
# cache and frequency effects of this size come and go between runs.
SPEED_MIN_EFFECT = 0.05
SPEED_VERDICTS = ("faster", "slower", "no measurable change")


def compare_latency(original: Callable[[Any], Any], compressed: Callable[[Any], Any], example_input: Any,
                    threads: int) -> dict[str, Any]:
    """Latency of both models measured interleaved, and the speedup (original / compressed) with its spread.

    Returns {"original": {latency_ms_p50, latency_ms_p95}, "compressed": {...}, "speedup", "speedup_low",
    "speedup_high", "speed_verdict", "speed_rounds", "speed_calls_per_round"}. The verdict is "faster" or
    "slower" only when the whole interval lies on one side of 1 and the median change is at least
    SPEED_MIN_EFFECT; otherwise "no measurable change".
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    models = (original, compressed)
    timings: tuple[list[float], list[float]] = ([], [])
    ratios: list[float] = []
    try:
        with torch.inference_mode():
            per_call = []
            for model in models:
                t0 = time.perf_counter()
                for _ in range(LATENCY_WARMUP):
                    model(example_input)
                per_call.append((time.perf_counter() - t0) / LATENCY_WARMUP)
            round_budget = SPEED_TIME_BUDGET_S / SPEED_MIN_ROUNDS / 2
            calls = max(1, min(SPEED_MAX_CALLS_PER_ROUND, int(round_budget / max(max(per_call), 1e-9))))
            started = time.perf_counter()
            for index in range(SPEED_MAX_ROUNDS):
                medians = [0.0, 0.0]
                for which in ((0, 1) if index % 2 == 0 else (1, 0)):
                    batch = []
                    for _ in range(calls):
                        t0 = time.perf_counter()
                        models[which](example_input)
                        batch.append((time.perf_counter() - t0) * 1e3)
                    timings[which].extend(batch)
                    medians[which] = statistics.median(batch)
                ratios.append(medians[0] / max(medians[1], 1e-9))
                if index + 1 >= SPEED_MIN_ROUNDS and time.perf_counter() - started > SPEED_TIME_BUDGET_S:
                    break
    finally:
        torch.set_num_threads(previous)
    speedup = statistics.median(ratios)
    low, high = _bootstrap_median_interval(ratios)
    return {
        "original": _latency_figures(timings[0]), "compressed": _latency_figures(timings[1]),
        "speedup": round(speedup, 4), "speedup_low": round(low, 4), "speedup_high": round(high, 4),
        "speed_verdict": speed_verdict(speedup, low, high),
        "speed_rounds": len(ratios), "speed_calls_per_round": calls,
    }


def speed_verdict(speedup: float, low: float, high: float) -> str:
    if low > 1.0 and speedup >= 1.0 + SPEED_MIN_EFFECT:
        return "faster"
    if high < 1.0 and speedup <= 1.0 / (1.0 + SPEED_MIN_EFFECT):
        return "slower"
    return "no measurable change"


def _bootstrap_median_interval(values: list[float]) -> tuple[float, float]:
    """A percentile-bootstrap interval of the median of `values` (seeded: the same timings, the same interval)."""
    generator = random.Random(0)
    count = len(values)
    medians = sorted(statistics.median(generator.choices(values, k=count)) for _ in range(SPEED_BOOTSTRAP_SAMPLES))
    tail = (1 - SPEED_CONFIDENCE) / 2
    return medians[int(tail * (len(medians) - 1))], medians[int((1 - tail) * (len(medians) - 1))]


def _latency_figures(timings_ms: list[float]) -> dict[str, float]:
    ordered = sorted(timings_ms)
    return {"latency_ms_p50": _percentile(ordered, 0.5), "latency_ms_p95": _percentile(ordered, 0.95)}


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
             parameters: tuple[int, int], latency: bool = True) -> dict[str, Any]:
    """Size, parameters, accuracy and (unless `latency` is False: measured later against the other model,
    interleaved) latency of one model."""
    total, nonzero = parameters
    figures: dict[str, Any] = {
        "size_bytes": size_bytes,
        "parameters": total,
        "nonzero_parameters": nonzero,
        "sparsity": round(1 - nonzero / total, 6) if total else 0.0,
    }
    if latency:
        figures.update(measure_latency(model, example_input, threads))
    figures["accuracy"] = accuracy(outputs, labels)
    return figures
