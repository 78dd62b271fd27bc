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

from worker.compression.base import Dataset, EngineError
from worker.compression.inputs import (
    Batch,
    OutputSelector,
    Signature,
    call_model,
    make_example,
    output_leaves,
    select_output,
)

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


def measure_latency(model: nn.Module, example_input: Batch, threads: int) -> dict[str, float]:
    """p50/p95 wall time of one forward pass at the example's batch size."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        timings: list[float] = []
        with torch.inference_mode():
            for _ in range(LATENCY_WARMUP):
                call_model(model, example_input)
            started = time.perf_counter()
            while len(timings) < LATENCY_MAX_ITERATIONS and (
                len(timings) < 10 or time.perf_counter() - started < LATENCY_TIME_BUDGET_S
            ):
                t0 = time.perf_counter()
                call_model(model, example_input)
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


def compare_latency(
    original: Callable[[Any], Any],
    compressed: Callable[[Any], Any],
    example_input: Any,
    threads: int,
    budget_s: float = SPEED_TIME_BUDGET_S,
) -> dict[str, Any]:
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
                    _call(model, example_input)
                per_call.append((time.perf_counter() - t0) / LATENCY_WARMUP)
            round_budget = budget_s / SPEED_MIN_ROUNDS / 2
            calls = max(1, min(SPEED_MAX_CALLS_PER_ROUND, int(round_budget / max(max(per_call), 1e-9))))
            started = time.perf_counter()
            for index in range(SPEED_MAX_ROUNDS):
                medians = [0.0, 0.0]
                for which in (0, 1) if index % 2 == 0 else (1, 0):
                    batch = []
                    for _ in range(calls):
                        t0 = time.perf_counter()
                        _call(models[which], example_input)
                        batch.append((time.perf_counter() - t0) * 1e3)
                    timings[which].extend(batch)
                    medians[which] = statistics.median(batch)
                ratios.append(medians[0] / max(medians[1], 1e-9))
                if index + 1 >= SPEED_MIN_ROUNDS and time.perf_counter() - started > budget_s:
                    break
    finally:
        torch.set_num_threads(previous)
    speedup = statistics.median(ratios)
    low, high = _bootstrap_median_interval(ratios)
    return {
        "original": _latency_figures(timings[0]),
        "compressed": _latency_figures(timings[1]),
        "speedup": round(speedup, 4),
        "speedup_low": round(low, 4),
        "speedup_high": round(high, 4),
        "speed_verdict": speed_verdict(speedup, low, high),
        "speed_rounds": len(ratios),
        "speed_calls_per_round": calls,
    }


def _call(model: Any, example_input: Any) -> Any:
    """A module is fed through the declared call (several inputs, constant kwargs); a runtime's callable directly."""
    return call_model(model, example_input) if isinstance(model, nn.Module) else model(example_input)


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


class Outputs(dict[str, torch.Tensor]):
    """Every floating tensor a model returned over a set of inputs, by output path ("0", "logits",
    "1.0"), concatenated over batches; `selected` names the one accuracy is scored on."""

    selected: str = ""

    @property
    def primary(self) -> torch.Tensor:
        return self[self.selected]


def predict(
    model: nn.Module, inputs: Batch, batch_size: int = EVAL_BATCH_SIZE, output: OutputSelector = None
) -> Outputs:
    """Run `model` over `inputs` batch by batch and keep every floating output tensor."""
    chunks: dict[str, list[torch.Tensor]] = {}
    selected_name = ""
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            out = call_model(model, inputs[start : start + batch_size])
            chosen = select_output(out, output)
            for name, leaf in output_leaves(out):
                if leaf.is_floating_point():
                    chunks.setdefault(name, []).append(leaf.float())
                    if leaf is chosen:
                        selected_name = name
    result = Outputs()
    for name, parts in chunks.items():
        # a leaf without a batch axis (a scalar loss, a pooled statistic) is kept from the first batch
        result[name] = torch.cat(parts) if parts[0].dim() else parts[0]
    if not result:
        raise EngineError("the model returned no floating-point tensor to measure")
    result.selected = selected_name or next(iter(result))
    return result


def _primary(outputs: torch.Tensor | Outputs) -> torch.Tensor:
    return outputs.primary if isinstance(outputs, Outputs) else outputs


def accuracy(outputs: torch.Tensor | Outputs, labels: torch.Tensor | None) -> float | None:
    scored = _primary(outputs)
    if labels is None or scored.dim() != 2 or scored.shape[0] != labels.shape[0]:
        return None
    return round(float((scored.argmax(1) == labels).float().mean()), 6)


def _sqnr(signal: float, error: float) -> float | None:
    if error == 0:
        return None
    return round(10 * math.log10(signal / error), 3) if signal > 0 else None


def fidelity(reference: torch.Tensor | Outputs, outputs: torch.Tensor | Outputs) -> dict[str, Any]:
    """How closely `outputs` follow the original model's `reference` outputs on the same inputs.

    `sqnr_db` / `output_mse` cover every floating output tensor together (total signal over total
    noise); with more than one output, `outputs` lists each one's figures; `top1_agreement` is on the
    selected output. Outputs only one side has (a runtime that returns the selected output alone)
    are compared on the selected output.
    """
    pairs: list[tuple[str, torch.Tensor, torch.Tensor]]
    if isinstance(reference, Outputs) and isinstance(outputs, Outputs) and set(reference) == set(outputs):
        pairs = [(name, reference[name], outputs[name]) for name in reference]
        primary = (reference.primary, outputs[reference.selected])
    else:
        primary = (_primary(reference), _primary(outputs))
        pairs = [("output", *primary)]
    per_output = []
    signal_sum = error_sum = 0.0
    count = 0
    for name, ref, out in pairs:
        if ref.shape != out.shape:
            raise EngineError(f"output {name} has shape {list(out.shape)} after compression, {list(ref.shape)} before")
        ref, out = ref.float(), out.float()
        error = float((ref - out).pow(2).sum())
        signal = float(ref.pow(2).sum())
        signal_sum, error_sum, count = signal_sum + signal, error_sum + error, count + ref.numel()
        per_output.append({"output": name, "sqnr_db": _sqnr(signal, error), "output_mse": error / max(1, ref.numel())})
    ref, out = primary
    agreement = None
    if ref.dim() == 2 and ref.shape[1] > 1:
        agreement = round(float((ref.argmax(1) == out.argmax(1)).float().mean()), 6)
    document: dict[str, Any] = {
        "top1_agreement": agreement,
        "output_mse": error_sum / max(1, count),
        "sqnr_db": _sqnr(signal_sum, error_sum),
    }
    if len(per_output) > 1:
        document["outputs"] = per_output
        document["scored_output"] = reference.selected if isinstance(reference, Outputs) else "output"
    return document


def fidelity_inputs(
    example_input: Batch,
    eval_data: Dataset | None,
    train_data: Dataset | None,
    limit: int = 512,
    seed: int = 0,
    signature: Signature | None = None,
) -> tuple[Batch, torch.Tensor | None]:
    """Inputs both models are compared on: the whole eval set (accuracy is reported on all of it),
    else up to `limit` training samples, else seeded random inputs as the signature declares them."""
    if eval_data is not None:
        return eval_data.inputs, eval_data.labels
    if train_data is not None:
        return train_data.inputs[:limit], None
    batch = max(64, len(example_input))
    if signature is not None and signature.inputs:
        return make_example(signature, batch=batch, seed=seed), None
    if not isinstance(example_input, torch.Tensor):
        raise EngineError("fidelity needs inputs: declare `inputs` or give a dataset")
    generator = torch.Generator().manual_seed(seed)
    shape = (batch,) + tuple(example_input.shape[1:])
    return torch.randn(shape, generator=generator, dtype=example_input.dtype), None


def describe(
    model: nn.Module,
    *,
    size_bytes: int,
    example_input: Batch,
    threads: int,
    outputs: torch.Tensor | Outputs,
    labels: torch.Tensor | None,
    parameters: tuple[int, int],
    latency: bool = True,
) -> dict[str, Any]:
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
