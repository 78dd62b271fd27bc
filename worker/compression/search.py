"""Accuracy-aware search: the smallest (or fastest) model that meets the user's bar.

Candidates run cheapest first (no-training quantization: dynamic int8, static int8, fp16; then
structured pruning; then unstructured pruning with bisection over the amount; then
distillation); a candidate whose size estimate cannot beat the best so far is skipped. Every
trial is recorded with its size, fidelity (and accuracy with labels) and its latency measured
interleaved with the original's (metrics.compare_latency: a speedup with its spread and a
verdict). A candidate that is not smaller than the upload, or is measurably slower than it,
never wins; under the latency objective a winner must be measurably faster. When no candidate
meets the bar the stage hands back the original model, unchanged, with `result:
"no_candidate_met_constraints"` (the closest candidate is named in the info), so a search never
delivers something worse than doing nothing.

For a job whose target runtime is not torch (ONNX Runtime), candidates are built and measured
in that runtime (worker.compression.search_runtime): quantization by the runtime's own tools,
sizes of the runtime's files, latency interleaved with the original exported to that runtime.
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
from worker.compression import breadcrumbs
from worker.compression import metrics as measure
from worker.compression.base import Dataset, EngineError, JobCancelled, ModelKind, StageContext, StageResult
from worker.compression.io import KIND_TO_FORMAT, default_output_format, load_artifact, save_artifact
from worker.compression.search_candidates import (
    CANDIDATE_SPEED_BUDGET_S,
    SPARSE_COST_PER_KEPT,
    Candidate,
    distill_candidates,
    pruning_candidate,
    runtime_candidates,
    synthetic_calibration,
    torch_candidates,
)
from worker.compression.search_candidates import linear_widths as linear_widths

AMOUNT_RANGE = (0.5, 0.97)
# Below the range's low end, amounts are probed downward to this one when the low end misses.
LOWEST_AMOUNT = 0.1
BISECTION_TOLERANCE = 0.02
ORIGINAL = "original (uncompressed)"
# int8 schemes whose quantize stage takes a bar and keeps the most harmful layers in float to meet it
MIXED_PRECISION_SCHEMES = ("dynamic_int8", "static_int8")


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
    # interleaved against the original (metrics.compare_latency)
    speed: dict[str, Any] | None = None
    calibration: str | None = None
    # for a runtime target: the quantization the runtime's tools apply to the exported float model
    runtime_quantization: dict[str, Any] | None = None

    def row(self) -> dict[str, Any]:
        row = {
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
        if self.speed is not None:
            row["original_latency_ms_p50"] = self.speed["original"]["latency_ms_p50"]
            for key in ("speedup", "speedup_low", "speedup_high", "speed_verdict"):
                row[key] = self.speed[key]
        if self.calibration is not None:
            row["calibration"] = self.calibration
        return row


class Search:
    def __init__(self, model: nn.Module, config: SearchConfig, ctx: StageContext) -> None:
        from worker.compression.search_runtime import RuntimeBench

        self.model, self.config, self.ctx = model, config, ctx
        self.started = time.monotonic()
        self.trials: list[Trial] = []
        self.eval_data: Dataset | None = ctx.eval_data or ctx.train_data
        if config.max_accuracy_drop is not None and (ctx.eval_data is None or ctx.eval_data.labels is None):
            raise EngineError("max_accuracy_drop needs an eval dataset with labels")
        self.inputs = self.eval_data.inputs if self.eval_data is not None else ctx.example_input
        self.reference = measure.predict(model, self.inputs)
        self.baseline_accuracy = measure.accuracy(self.reference, ctx.eval_data.labels if ctx.eval_data else None)
        # In a runtime target, candidates are measured against the original exported to that runtime.
        self.bench = RuntimeBench(model, ctx) if ctx.runtime != "torch" else None
        # The bar a candidate must beat is the file the user uploaded, when the pipeline says its size.
        if self.bench is not None:
            self.original_size = self.bench.original_size
        else:
            self.original_size = (
                ctx.original_size_bytes or self._saved(model, ctx.kind, default_output_format(ctx.kind, None))[0]
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
            return max(met, key=lambda t: (t.speed or {}).get("speedup") or 0.0)
        return min(met, key=lambda t: (t.size_bytes or float("inf"), -((t.speed or {}).get("speedup") or 0.0)))

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
    def _saved(self, model: nn.Module, kind: ModelKind, output_format: str) -> tuple[int, nn.Module | None]:
        """The size of `model` saved as the user would download it, and the file loaded back where it runs."""
        with tempfile.TemporaryDirectory(prefix="search-") as folder:
            path = Path(folder) / "candidate"
            save_artifact(model, kind, output_format, path, self.ctx.example_input, self.ctx.signature)
            loaded = None
            if output_format in ("torchscript", "exported_program"):
                reloaded = load_artifact(path, output_format)
                loaded = reloaded if isinstance(reloaded, nn.Module) else None
            return path.stat().st_size, loaded

    def _copy(self) -> nn.Module:
        if self.ctx.kind == "torchscript":
            buffer = io.BytesIO()
            torch.jit.save(self.model, buffer)
            buffer.seek(0)
            copied: nn.Module = torch.jit.load(buffer)  # type: ignore[no-untyped-call]  # torch leaves this unannotated
            return copied
        return copy.deepcopy(self.model)

    def _validated(self, stages: list[dict[str, Any]], synthetic_data: bool = False) -> list[StageConfig]:
        facts = JobFacts(
            model_format=KIND_TO_FORMAT[self.ctx.kind],
            has_dataset=self.ctx.train_data is not None or synthetic_data,
            dataset_has_labels=self.ctx.train_data is not None and self.ctx.train_data.labels is not None,
            eval_has_labels=self.ctx.eval_data is not None and self.ctx.eval_data.labels is not None,
            runtime=self.ctx.runtime,
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
        self.ctx.check_cancelled()
        trial = Trial(candidate.name, candidate.stages, "failed", calibration=candidate.calibration)
        if not self.can_beat_best(candidate):
            trial.status, trial.reason = "skipped", "its estimated size cannot beat the best candidate so far"
            self.trials.append(trial)
            return trial
        started = time.monotonic()
        try:
            with breadcrumbs.within(f"candidate {candidate.name}"):
                self._build_and_measure(candidate, trial)
            trial.status = "met" if self._meets(trial) else "missed"
        except JobCancelled:
            raise
        except Exception as error:  # one broken candidate must not end the search
            trial.status, trial.reason, trial.model = "failed", f"{type(error).__name__}: {error}"[:300], None
        trial.seconds = time.monotonic() - started
        self.trials.append(trial)
        self._drop_models_except_best()
        self._report()
        return trial

    def _build_and_measure(self, candidate: Candidate, trial: Trial) -> None:
        from worker.compression.handlers import compress

        model, kind = self._copy(), self.ctx.kind
        preferred: str | None = None
        parameters = measure.count_parameters(model)
        calibration = self.ctx.train_data
        if candidate.calibration == "synthetic":
            calibration = synthetic_calibration(self.ctx.example_input, self.ctx.signature, self.ctx.seed)
        for config in self._validated(candidate.stages, calibration is not None):
            if self.bench is not None and config.method == "quantize":
                # the target runtime quantizes the exported float model with its own tools
                trial.runtime_quantization = {"scheme": config.scheme, "options": config.options()}
                continue
            stage_ctx = copy.copy(self.ctx)
            stage_ctx.kind = kind
            stage_ctx.progress = lambda fraction, message: breadcrumbs.operation(message or "running")
            if config.method == "quantize":
                stage_ctx.train_data = calibration
            result: StageResult = compress(model, config, stage_ctx)
            model, kind, preferred = result.model, result.kind, result.preferred_output_format
            if config.method != "quantize":
                parameters = measure.count_parameters(model)
        trial.parameters, trial.model, trial.kind = parameters, model, kind
        outputs: torch.Tensor | measure.Outputs
        if self.bench is not None:
            measured = self.bench.measure(model, trial.runtime_quantization, calibration, len(self.trials))
            trial.size_bytes, outputs, trial.speed = measured
        else:
            trial.output_format = default_output_format(kind, preferred)
            breadcrumbs.operation(f"saving as {trial.output_format}")
            trial.size_bytes, loaded = self._saved(model, kind, trial.output_format)
            served = loaded if loaded is not None else model
            breadcrumbs.operation("measuring fidelity and latency")
            outputs = measure.predict(served, self.inputs)
            trial.speed = measure.compare_latency(
                self.model, served, self.ctx.example_input, self.ctx.threads, CANDIDATE_SPEED_BUDGET_S
            )
        trial.latency_ms_p50 = trial.speed["compressed"]["latency_ms_p50"]
        trial.sqnr_db = measure.fidelity(self.reference, outputs)["sqnr_db"]
        if self.ctx.eval_data is not None and self.ctx.eval_data.labels is not None:
            trial.accuracy = measure.accuracy(outputs, self.ctx.eval_data.labels)
            if trial.accuracy is not None and self.baseline_accuracy is not None:
                trial.accuracy_drop = round(self.baseline_accuracy - trial.accuracy, 6)

    def _meets(self, trial: Trial) -> bool:
        speed = trial.speed or {}
        if trial.size_bytes is None or trial.size_bytes >= self.original_size:
            trial.reason = f"not smaller than the original ({trial.size_bytes} B vs {self.original_size} B)"
            return False
        if speed.get("speed_verdict") == "slower":
            trial.reason = (
                f"slower than the original ({speed['speedup']:.2f}x, {speed['speedup_low']:.2f}-"
                f"{speed['speedup_high']:.2f})"
            )
            return False
        if self.config.objective == "latency" and speed.get("speed_verdict") != "faster":
            trial.reason = f"not measurably faster than the original ({speed.get('speedup')}x)"
            return False
        if self.config.max_accuracy_drop is not None:
            if trial.accuracy_drop is None or trial.accuracy_drop > self.config.max_accuracy_drop + 1e-9:
                trial.reason = f"accuracy drop {trial.accuracy_drop} exceeds {self.config.max_accuracy_drop}"
                return False
        if self.config.min_sqnr_db is not None:
            if trial.sqnr_db is not None and trial.sqnr_db < self.config.min_sqnr_db:
                trial.reason = f"SQNR {trial.sqnr_db} dB is below {self.config.min_sqnr_db} dB"
                return False
        return True

    def _drop_models_except_best(self) -> None:
        keep = {id(self.best()), id(self.closest())}
        for trial in self.trials:
            if id(trial) not in keep:
                trial.model = None


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

    in_runtime = search.bench is not None
    try:
        for candidate in runtime_candidates(search) if in_runtime else torch_candidates(search):
            if search.out_of_budget():
                break
            search.run(candidate)
        if not in_runtime:
            _mixed_precision_fallback(search)
        # A runtime's file stores zeros densely, so unstructured sparsity gains nothing there.
        if not in_runtime and (not user_recipes or amount_range):
            _bisect_pruning(search, low, high, lowest=low if amount_range else min(low, LOWEST_AMOUNT))

        for candidate in distill_candidates(search) if not user_recipes and not in_runtime else []:
            if search.out_of_budget():
                break
            search.run(candidate)
    finally:
        if search.bench is not None:
            search.bench.close()
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
        "runtime": ctx.runtime,
        "measured_in": (
            f"{ctx.runtime}: each candidate's file built and loaded there, latency interleaved with the "
            f"original exported to {ctx.runtime}"
            if search.bench is not None
            else "torch: each candidate saved as it would download and loaded back, latency interleaved "
            "with the original's"
        ),
        "candidate_speed_budget_s": CANDIDATE_SPEED_BUDGET_S,
    }
    if chosen.runtime_quantization is not None:
        info["runtime_quantization"] = chosen.runtime_quantization
    if chosen.calibration is not None:
        info["calibration"] = chosen.calibration
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
    elif chosen.calibration == "synthetic":
        info["warnings"] = [
            "the chosen static int8 was calibrated on synthetic inputs drawn from the declared input shapes "
            "(the job has no dataset); give the job a dataset_id to calibrate on real data"
        ]
    if chosen.parameters is not None:
        info["parameters"] = list(chosen.parameters)
    ctx.progress(1.0, f"{outcome}: {chosen.candidate}")
    assert chosen.model is not None and chosen.kind is not None
    return StageResult(model=chosen.model, kind=chosen.kind, info=info, preferred_output_format=chosen.output_format)
