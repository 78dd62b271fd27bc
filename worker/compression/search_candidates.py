"""The recipes the accuracy-aware search tries, cheapest first, and what each is expected to weigh.

For PyTorch: dynamic int8, static int8 (calibrated on the job's dataset, or on synthetic inputs
drawn from the declared input shapes when the job has none; the trial says which), fp16, and
structured pruning (whole channels, with a short fine-tune when the dataset has labels); then
unstructured pruning bisected over the amount, then distillation for MLP chains. For ONNX
Runtime: ORT's own dynamic and static QDQ int8 and structured pruning, alone and followed by
static int8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from worker.compression.base import Dataset
from worker.compression.inputs import Batch, ModelInputs, Signature, make_example

if TYPE_CHECKING:
    from worker.compression.search import Search

DISTILL_WIDTHS = (0.25, 0.5)
STRUCTURED_AMOUNTS = (0.25, 0.5)
STRUCTURED_FINETUNE_EPOCHS = 2
# Pruning candidates are stored as sparse_state_dict (dense or CSR with int32 indices, which
# clients load with a one-liner): about twice a dense weight per kept value (value + index).
SPARSE_COST_PER_KEPT = 2.0
SYNTHETIC_CALIBRATION_SAMPLES = 64
# Seconds of interleaved timing per candidate (against the original): enough rounds for a verdict on
# models that run in milliseconds; the final artifact is measured again, longer, by the pipeline.
CANDIDATE_SPEED_BUDGET_S = 1.0


@dataclass
class Candidate:
    name: str
    stages: list[dict[str, Any]]
    estimated_size_ratio: float
    # where static int8 takes its calibration from: "dataset" or "synthetic"; None when not calibrated
    calibration: str | None = None


def sparse_size_ratio(amount: float) -> float:
    """Estimated size of pruned weights relative to dense, at `amount` zeros."""
    return min(1.0, SPARSE_COST_PER_KEPT * (1 - amount))


def structured_size_ratio(amount: float) -> float:
    """Estimated size after removing `amount` of the channels: a layer loses its outputs and the next one
    its inputs, so most weights shrink on both sides."""
    return (1 - amount) ** 2


def calibration_source(search: Search) -> str | None:
    """ "dataset" when the job has one, "synthetic" when inputs can be drawn from the declared shapes."""
    if search.ctx.train_data is not None and len(search.ctx.train_data) > 0:
        return "dataset"
    if synthetic_calibration(search.ctx.example_input, search.ctx.signature, search.ctx.seed) is not None:
        return "synthetic"
    return None


def synthetic_calibration(example: Batch, signature: Signature | None, seed: int) -> Dataset | None:
    """Seeded random inputs of the declared shapes and dtypes (no labels), or None when nothing is declared.

    Random inputs calibrate activation ranges only as well as they resemble the data the model will
    see; without a dataset the trial's fidelity is measured on random inputs too, and the search's
    report says the calibration was synthetic.
    """
    if signature is not None and signature.inputs:
        inputs: Batch = make_example(signature, batch=SYNTHETIC_CALIBRATION_SAMPLES, seed=seed + 1)
        return Dataset(inputs)
    if isinstance(example, torch.Tensor) and example.is_floating_point():
        generator = torch.Generator().manual_seed(seed + 1)
        shape = (SYNTHETIC_CALIBRATION_SAMPLES, *example.shape[1:])
        return Dataset(torch.randn(shape, generator=generator).to(example.dtype))
    return None


def _labelled(search: Search) -> bool:
    train = search.ctx.train_data
    return train is not None and train.labels is not None


def _structured_stage(search: Search, amount: float) -> dict[str, Any]:
    stage: dict[str, Any] = {"method": "prune", "scheme": "ln_structured", "amount": amount}
    if _labelled(search):
        stage["train"] = search.config.train or {"epochs": STRUCTURED_FINETUNE_EPOCHS}
    return stage


def torch_candidates(search: Search) -> list[Candidate]:
    """The no-bisection candidates for a PyTorch target, cheapest first."""
    user = (search.config.candidates or {}).get("recipes")
    if user:
        return [Candidate(f"recipe {i}", stages, 1.0) for i, stages in enumerate(user)]
    candidates = [Candidate("dynamic_int8", [{"method": "quantize", "scheme": "dynamic_int8"}], 0.3)]
    source = calibration_source(search)
    if source is not None:
        candidates.append(
            Candidate(
                f"static_int8 ({source} calibration)", [{"method": "quantize", "scheme": "static_int8"}], 0.27, source
            )
        )
    fp16 = Candidate("fp16", [{"method": "quantize", "scheme": "fp16"}], 0.5)
    # x86 CPUs run fp16 slower than float32, so on a CPU it can only win where nothing else runs:
    # tried last there, it does not use up a small trial budget before structured pruning is tried
    on_cpu = search.ctx.device.type == "cpu"
    if not on_cpu:
        candidates.append(fp16)
    if search.ctx.kind != "torchscript":  # ln_structured changes the model's code, which TorchScript hides
        for amount in STRUCTURED_AMOUNTS:
            stage = _structured_stage(search, amount)
            candidates.append(Candidate(f"ln_structured {amount}", [stage], structured_size_ratio(amount)))
        if source is not None:
            amount = STRUCTURED_AMOUNTS[0]
            candidates.append(
                Candidate(
                    f"ln_structured {amount} + static_int8 ({source} calibration)",
                    [_structured_stage(search, amount), {"method": "quantize", "scheme": "static_int8"}],
                    0.27 * structured_size_ratio(amount),
                    source,
                )
            )
    if on_cpu:
        candidates.append(fp16)
    return candidates


def runtime_candidates(search: Search) -> list[Candidate]:
    """The candidates for an ONNX Runtime target: ORT's int8 schemes, structured pruning, and both."""
    user = (search.config.candidates or {}).get("recipes")
    if user:
        return [Candidate(f"recipe {i}", stages, 1.0) for i, stages in enumerate(user)]
    runtime = search.ctx.runtime
    candidates = [Candidate(f"{runtime} dynamic_int8", [{"method": "quantize", "scheme": "dynamic_int8"}], 0.3)]
    source = calibration_source(search)
    static = {"method": "quantize", "scheme": "static_int8"}
    if source is not None:
        candidates.append(Candidate(f"{runtime} static_int8 ({source} calibration)", [static], 0.27, source))
    for amount in STRUCTURED_AMOUNTS:
        stage = _structured_stage(search, amount)
        candidates.append(Candidate(f"ln_structured {amount}", [stage], structured_size_ratio(amount)))
        if source is not None:
            candidates.append(
                Candidate(
                    f"ln_structured {amount} + {runtime} static_int8 ({source} calibration)",
                    [_structured_stage(search, amount), static],
                    0.27 * structured_size_ratio(amount),
                    source,
                )
            )
    return candidates


def pruning_candidate(search: Search, amount: float) -> Candidate:
    stage: dict[str, Any] = {"method": "prune", "scheme": "global_l1_unstructured", "amount": round(amount, 4)}
    if _labelled(search):
        stage["schedule"] = {"steps": 3, "finetune_epochs": 2}
        if search.config.train:
            stage["train"] = search.config.train
    return Candidate(f"prune {amount:.3f}", [stage], sparse_size_ratio(amount))


def linear_widths(model: nn.Module, example: Batch) -> list[int] | None:
    """[in, hidden..., out] when the model's matrix weights form one chain of Linear layers."""
    if isinstance(example, ModelInputs):
        return None
    weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
    if not weights or any(w.dim() != 2 for w in weights):
        return None
    widths = [int(weights[0].shape[1])]
    for weight in weights:
        if int(weight.shape[1]) != widths[-1]:
            return None
        widths.append(int(weight.shape[0]))
    if example.dim() != 2 or int(example.shape[1]) != widths[0]:
        return None
    return widths


def distill_candidates(search: Search) -> list[Candidate]:
    widths = linear_widths(search.model, search.ctx.example_input)
    if not _labelled(search) or widths is None or len(widths) < 3:
        return []
    candidates = []
    for multiplier in DISTILL_WIDTHS:
        student = [widths[0]] + [max(4, round(w * multiplier)) for w in widths[1:-1]] + [widths[-1]]
        stages: list[dict[str, Any]] = [
            {
                "method": "distill",
                "scheme": "hinton",
                "student": {"architecture": {"name": "mlp", "kwargs": {"widths": student}}},
            },
            {"method": "quantize", "scheme": "dynamic_int8"},
        ]
        if search.config.train:
            stages[0]["train"] = search.config.train
        teacher_params = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
        student_params = sum(a * b for a, b in zip(student[:-1], student[1:]))
        candidates.append(Candidate(f"distill mlp{student} + int8", stages, 0.3 * student_params / teacher_params))
    return candidates
