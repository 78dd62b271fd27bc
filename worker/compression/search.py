"""Accuracy-aware search: the smallest (or fastest) model that meets the user's bar.

Candidates run cheapest first (no-training quantization, then pruning with
bisection over the amount, then distillation); a candidate whose size estimate
cannot beat the best so far is skipped. Every trial is recorded. The original is
always a candidate: under the size objective a candidate that is not smaller
than the upload never meets the bar, and when no candidate meets it the stage
hands back the original model, unchanged, with `result:
"no_candidate_met_constraints"` (the closest candidate is named in the info), so
a search never delivers something worse than doing nothing.
"""

from __future__ import annotations

import copy
import io
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelpress.catalog import JobFacts, SpecError, validate_stages
from modelpress.configs import AccuracyAwareConfig, StageConfig
from worker.compression import metrics as measure
from worker.compression.base import Dataset, EngineError, JobCancelled, ModelKind, StageContext, StageResult
from worker.compression.inputs import Batch
from worker.compression.io import KIND_TO_FORMAT, default_output_format, save_artifact

AMOUNT_RANGE = (0.5, 0.97)
# Below the range's low end, amounts are probed downward to this one when the low end misses.
LOWEST_AMOUNT = 0.1
BISECTION_TOLERANCE = 0.02
DISTILL_WIDTHS = (0.25, 0.5)
# Pruning candidates are stored as sparse_state_dict (dense or CSR with int32 indices, which
# clients load with a one-liner): about twice a dense weight per kept value (value + index).
SPARSE_COST_PER_KEPT = 2.0
ORIGINAL = "original (uncompressed)"
# int8 schemes whose quantize stage takes a bar and keeps the most harmful layers in float to meet it
MIXED_PRECISION_SCHEMES = ("dynamic_int8", "static_int8")


def sparse_size_ratio(amount: float) -> float:
    """Estimated size of pruned weights relative to dense, at `amount` zeros."""
    return min(1.0, SPARSE_COST_PER_KEPT * (1 - amount))


@dataclass(frozen=True)
class SearchConfig:
    """The search/accuracy_aware options; defaults from its typed config (AccuracyAwareConfig)."""

    max_accuracy_drop: float | None
    min_sqnr_db: float | None
    objective: str
    candidates: dict[str, Any] | None
    max_trials: int
    time_budget_s: float
    train: dict[str, Any] | None

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> SearchConfig:
        given = {**AccuracyAwareConfig().options(), **options}
        config = cls(**{k: given[k] for k in cls.__dataclass_fields__})
        if config.max_accuracy_drop is None and config.min_sqnr_db is None:
            raise EngineError("search needs max_accuracy_drop or min_sqnr_db")
        return config


@dataclass
class Candidate:
    name: str
    stages: list[dict[str, Any]]
    estimated_size_ratio: float


@dataclass
class Trial:
    candidate: str
    stages: list[dict[str, Any]]
    status: str  # "met" | "missed" | "failed" | "skipped"
    size_bytes: int | None = None
    accuracy: float | None = None
    accuracy_drop: float | None = None
    sqnr_db: float | None = None
    latency_ms_p50: float | None = None
    seconds: float = 0.0
    reason: str | None = None
    model: nn.Module | None = field(default=None, repr=False)
    kind: ModelKind | None = None
    output_format: str | None = None
    parameters: tuple[int, int] | None = None

    def row(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate,
            "stages": self.stages,
            "status": self.status,
            "size_bytes": self.size_bytes,
            "accuracy": self.accuracy,
            "accuracy_drop": self.accuracy_drop,
            "sqnr_db": self.sqnr_db,
            "latency_ms_p50": self.latency_ms_p50,
            "seconds": round(self.seconds, 3),
            "reason": self.reason,
        }


class Search:
    def __init__(self, model: nn.Module, config: SearchConfig, ctx: StageContext) -> None:
        self.model, self.config, self.ctx = model, config, ctx
        self.started = time.monotonic()
        self.trials: list[Trial] = []
        self.eval_data: Dataset | None = ctx.eval_data or ctx.train_data
        if config.max_accuracy_drop is not None and (ctx.eval_data is None or ctx.eval_data.labels is None):
            raise EngineError("max_accuracy_drop needs an eval dataset with labels")
        self.inputs = self.eval_data.inputs if self.eval_data is not None else ctx.example_input
        self.reference = measure.predict(model, self.inputs)
        self.baseline_accuracy = measure.accuracy(self.reference, ctx.eval_data.labels if ctx.eval_data else None)
        # The bar a candidate must beat is the file the user uploaded, when the pipeline says its size.
        self.original_size = ctx.original_size_bytes or self._artifact_size(
            model, ctx.kind, default_output_format(ctx.kind, None)
        )
        self.planned = config.max_trials

    # ---------------------------------------------------------------- bookkeeping
    def out_of_budget(self) -> bool:
        return (
            len([t for t in self.trials if t.status != "skipped"]) >= self.config.max_trials
            or time.monotonic() - self.started > self.config.time_budget_s
        )

    def best(self) -> Trial | None:
        met = [t for t in self.trials if t.status == "met"]
        if not met:
            return None
        if self.config.objective == "latency":
            return min(met, key=lambda t: t.latency_ms_p50 or float("inf"))
        return min(met, key=lambda t: t.size_bytes or float("inf"))

    def closest(self) -> Trial | None:
        tried = [t for t in self.trials if t.status == "missed"]
        if not tried:
            return None
        if self.config.max_accuracy_drop is not None:
            return min(tried, key=lambda t: t.accuracy_drop if t.accuracy_drop is not None else float("inf"))
        return max(tried, key=lambda t: t.sqnr_db if t.sqnr_db is not None else float("-inf"))

    def _report(self) -> None:
        done = len([t for t in self.trials if t.status != "skipped"])
        self.ctx.progress(min(done / max(self.planned, 1), 0.99), f"trial {done}/{self.planned}")
        self.ctx.event("trial", self.trials[-1].row())

    # ---------------------------------------------------------------- trials
    def _artifact_size(self, model: nn.Module, kind: ModelKind, output_format: str) -> int:
        with tempfile.TemporaryDirectory(prefix="search-") as folder:
            path = Path(folder) / "candidate"
            save_artifact(model, kind, output_format, path, self.ctx.example_input, self.ctx.signature)
            return path.stat().st_size

    def _copy(self) -> nn.Module:
        if self.ctx.kind == "torchscript":
            buffer = io.BytesIO()
            torch.jit.save(self.model, buffer)
            buffer.seek(0)
            copied: nn.Module = torch.jit.load(buffer)  # type: ignore[no-untyped-call]  # torch leaves this unannotated
            return copied
        return copy.deepcopy(self.model)

    def _validated(self, stages: list[dict[str, Any]]) -> list[StageConfig]:
        facts = JobFacts(
            model_format=KIND_TO_FORMAT[self.ctx.kind],
            has_dataset=self.ctx.train_data is not None,
            dataset_has_labels=self.ctx.train_data is not None and self.ctx.train_data.labels is not None,
            eval_has_labels=self.ctx.eval_data is not None and self.ctx.eval_data.labels is not None,
        )
        try:
            validated = validate_stages(stages, facts)
        except SpecError as error:
            raise EngineError(str(error)) from error
        return [v.config for v in validated]

    def can_beat_best(self, candidate: Candidate) -> bool:
        best = self.best()
        if best is None or self.config.objective != "size" or best.size_bytes is None:
            return True
        return candidate.estimated_size_ratio * self.original_size < best.size_bytes

    def run(self, candidate: Candidate) -> Trial:
        from worker.compression.handlers import compress

        self.ctx.check_cancelled()
        trial = Trial(candidate.name, candidate.stages, "failed")
        if not self.can_beat_best(candidate):
            trial.status, trial.reason = "skipped", "its estimated size cannot beat the best candidate so far"
            self.trials.append(trial)
            return trial
        started = time.monotonic()
        try:
            model, kind = self._copy(), self.ctx.kind
            preferred: str | None = None
            parameters = measure.count_parameters(model)
            for config in self._validated(candidate.stages):
                stage_ctx = copy.copy(self.ctx)
                stage_ctx.kind = kind
                stage_ctx.progress = lambda fraction, message: None
                result: StageResult = compress(model, config, stage_ctx)
                model, kind, preferred = result.model, result.kind, result.preferred_output_format
                if config.method != "quantize":
                    parameters = measure.count_parameters(model)
            trial.parameters = parameters
            trial.output_format = default_output_format(kind, preferred)
            trial.size_bytes = self._artifact_size(model, kind, trial.output_format)
            outputs = measure.predict(model, self.inputs)
            trial.sqnr_db = measure.fidelity(self.reference, outputs)["sqnr_db"]
            if self.ctx.eval_data is not None and self.ctx.eval_data.labels is not None:
                trial.accuracy = measure.accuracy(outputs, self.ctx.eval_data.labels)
                if trial.accuracy is not None and self.baseline_accuracy is not None:
                    trial.accuracy_drop = round(self.baseline_accuracy - trial.accuracy, 6)
            if self.config.objective == "latency":
                trial.latency_ms_p50 = measure.measure_latency(model, self.ctx.example_input, 1)["latency_ms_p50"]
            trial.status = "met" if self._meets(trial) else "missed"
            trial.model, trial.kind = model, kind
        except JobCancelled:
            raise
        except Exception as error:  # one broken candidate must not end the search
            trial.status, trial.reason = "failed", f"{type(error).__name__}: {error}"[:300]
        trial.seconds = time.monotonic() - started
        self.trials.append(trial)
        self._drop_models_except_best()
        self._report()
        return trial

    def _meets(self, trial: Trial) -> bool:
        if self.config.objective == "size" and (trial.size_bytes is None or trial.size_bytes >= self.original_size):
            trial.reason = f"not smaller than the original ({trial.size_bytes} B vs {self.original_size} B)"
            return False
        if self.config.max_accuracy_drop is not None:
            if trial.accuracy_drop is None or trial.accuracy_drop > self.config.max_accuracy_drop + 1e-9:
                return False
        if self.config.min_sqnr_db is not None:
            if trial.sqnr_db is not None and trial.sqnr_db < self.config.min_sqnr_db:
                return False
        return True

    def _drop_models_except_best(self) -> None:
        keep = {id(self.best()), id(self.closest())}
        for trial in self.trials:
            if id(trial) not in keep:
                trial.model = None


# -------------------------------------------------------------------- candidates


def linear_widths(model: nn.Module, example: Batch) -> list[int] | None:
    """[in, hidden..., out] when the model's matrix weights form one chain of Linear layers."""
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


def fixed_candidates(search: Search) -> list[Candidate]:
    user = (search.config.candidates or {}).get("recipes")
    if user:
        return [Candidate(f"recipe {i}", stages, 1.0) for i, stages in enumerate(user)]
    return [
        Candidate("dynamic_int8", [{"method": "quantize", "scheme": "dynamic_int8"}], 0.3),
        Candidate("fp16", [{"method": "quantize", "scheme": "fp16"}], 0.5),
    ]


def pruning_candidate(search: Search, amount: float) -> Candidate:
    stage: dict[str, Any] = {"method": "prune", "scheme": "global_l1_unstructured", "amount": round(amount, 4)}
    train = search.ctx.train_data
    if train is not None and train.labels is not None:
        stage["schedule"] = {"steps": 3, "finetune_epochs": 2}
        if search.config.train:
            stage["train"] = search.config.train
    return Candidate(f"prune {amount:.3f}", [stage], sparse_size_ratio(amount))


def distill_candidates(search: Search) -> list[Candidate]:
    train = search.ctx.train_data
    widths = linear_widths(search.model, search.ctx.example_input)
    if train is None or train.labels is None or widths is None or len(widths) < 3:
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


def run_stage(model: nn.Module, scheme: str, options: dict[str, Any], ctx: StageContext) -> StageResult:
    """Search recipes for the smallest (or fastest) model within the bar.

    Example:
        >>> run_stage(model, "accuracy_aware", {"max_accuracy_drop": 0.01, "objective": "size"}, ctx)
    """
    config = SearchConfig.from_options(options)
    search = Search(model, config, ctx)
    amount_range = (config.candidates or {}).get("amount") or {}
    low = float(amount_range.get("min", AMOUNT_RANGE[0]))
    high = float(amount_range.get("max", AMOUNT_RANGE[1]))
    user_recipes = bool((config.candidates or {}).get("recipes"))

    for candidate in fixed_candidates(search):
        if search.out_of_budget():
            break
        search.run(candidate)

    _mixed_precision_fallback(search)

    if not user_recipes or amount_range:
        _bisect_pruning(search, low, high, lowest=low if amount_range else min(low, LOWEST_AMOUNT))

    for candidate in distill_candidates(search) if not user_recipes else []:
        if search.out_of_budget():
            break
        search.run(candidate)
    return _outcome(search, model, ctx)


def _mixed_precision_fallback(search: Search) -> None:
    """Each int8 trial that missed the bar only on fidelity is tried once more as mixed precision:
    the quantize stage with the search's bar, which keeps the most harmful layers of the sensitivity
    table in float until the bar holds (`worker.compression.mixed_precision`)."""
    bar = {"min_sqnr_db": search.config.min_sqnr_db, "max_accuracy_drop": search.config.max_accuracy_drop}
    for trial in list(search.trials):
        stage = trial.stages[0] if len(trial.stages) == 1 else {}
        if (
            trial.status != "missed"
            or stage.get("method") != "quantize"
            or stage.get("scheme") not in MIXED_PRECISION_SCHEMES
            or any(stage.get(key) is not None for key in bar)  # already mixed precision
            or trial.size_bytes is None
            or trial.size_bytes >= search.original_size  # missed on size: float layers only add bytes
        ):
            continue
        if search.out_of_budget():
            return
        mixed = {**stage, **{key: value for key, value in bar.items() if value is not None}}
        search.run(Candidate(f"{trial.candidate} mixed precision", [mixed], trial.size_bytes / search.original_size))


def _bisect_pruning(search: Search, low: float, high: float, lowest: float) -> None:
    """The highest pruning amount in [lowest, high] that meets the bar, probing `low` first.

    When `low` meets, the amount is bisected upward towards `high`; when it misses, downward
    towards `lowest`, so the trials the user allowed are spent while an amount is left to try.
    """
    best = search.best()
    if best is not None and best.size_bytes and search.config.objective == "size":
        # amounts whose sparse size cannot beat the best so far are not worth a trial
        needed = 1 - best.size_bytes / (SPARSE_COST_PER_KEPT * search.original_size) + BISECTION_TOLERANCE
        low = min(high, max(low, needed))
        lowest = max(lowest, needed)
    if search.out_of_budget():
        return
    first = search.run(pruning_candidate(search, low))
    if first.status == "skipped":
        return
    if first.status == "met":
        passing, failing = low, high + 1e-9
        probe = search.run(pruning_candidate(search, high)) if not search.out_of_budget() else None
        if probe is not None and probe.status == "met":
            return
    else:
        passing, failing = lowest - 1e-9, low
        if lowest >= low:
            return
        probe = search.run(pruning_candidate(search, lowest)) if not search.out_of_budget() else None
        if probe is None or probe.status != "met":
            return
        passing = lowest
    while failing - passing > BISECTION_TOLERANCE and not search.out_of_budget():
        middle = (passing + min(failing, high)) / 2
        result = search.run(pruning_candidate(search, middle))
        if result.status == "met":
            passing = middle
        elif result.status == "skipped":
            break
        else:
            failing = middle


def _outcome(search: Search, model: nn.Module, ctx: StageContext) -> StageResult:
    config = search.config
    chosen = search.best()
    outcome = "met" if chosen is not None else "no_candidate_met_constraints"
    closest = search.closest() if chosen is None else None
    if chosen is None:
        # Nothing met the bar: doing nothing is the honest answer, the original goes back unchanged.
        chosen = Trial(
            ORIGINAL,
            [],
            "baseline",
            size_bytes=search.original_size,
            accuracy=search.baseline_accuracy,
            accuracy_drop=0.0 if search.baseline_accuracy is not None else None,
            reason="no candidate met the constraints; the original is returned unchanged",
            model=model,
            kind=ctx.kind,
            parameters=measure.count_parameters(model),
        )
    info: dict[str, Any] = {
        "result": outcome,
        "objective": config.objective,
        "constraints": {"max_accuracy_drop": config.max_accuracy_drop, "min_sqnr_db": config.min_sqnr_db},
        "baseline_accuracy": search.baseline_accuracy,
        "original_size_bytes": search.original_size,
        "chosen": chosen.row(),
        "delivers_original": chosen.candidate == ORIGINAL,
        "trials": [t.row() for t in search.trials],
        "trials_run": len([t for t in search.trials if t.status != "skipped"]),
        "seconds": round(time.monotonic() - search.started, 3),
    }
    if closest is not None:
        info["closest"] = closest.row()
    if chosen.candidate == ORIGINAL:
        tried = info["trials_run"]
        info["warnings"] = [
            f"no candidate of {tried} tried met the constraints while being smaller than the original"
            if config.objective == "size"
            else f"no candidate of {tried} tried met the constraints",
            "the original model is returned unchanged",
        ]
    if chosen.parameters is not None:
        info["parameters"] = list(chosen.parameters)
    ctx.progress(1.0, f"{outcome}: {chosen.candidate}")
    assert chosen.model is not None and chosen.kind is not None
    return StageResult(model=chosen.model, kind=chosen.kind, info=info, preferred_output_format=chosen.output_format)
