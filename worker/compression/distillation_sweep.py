"""Distillation never ships worse than its baseline: the small (temperature, alpha) sweep and the choice.

With labels, the distill stage trains the baseline student (labels alone, same budget
and seed) and a few distilled students: the job's (temperature, alpha) first, then the
settings of SWEEP in order while the stage's time budget allows (each run is assumed
to cost what the slowest run so far cost). It delivers the run with the best accuracy
on the evaluation data (the eval set, else the held-out split); a tie goes to
distillation, the method the user asked for. When no distilled run beats the baseline,
the baseline is delivered and the job says so in metrics.warnings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Common KD settings (Hinton et al. 2015; Cho & Hariharan 2019): soft targets at a few temperatures, and a
# label-heavy mix for teachers that are little better than the student.
SWEEP: tuple[tuple[float, float], ...] = ((4.0, 0.5), (2.0, 0.9), (1.0, 0.2), (8.0, 0.7))
MAX_RUNS = 1 + len(SWEEP)


@dataclass
class Run:
    name: str
    temperature: float | None
    alpha: float | None
    accuracy: float | None
    seconds: float
    training: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        return {
            "run": self.name,
            "temperature": self.temperature,
            "alpha": self.alpha,
            "accuracy": self.accuracy,
            "seconds": round(self.seconds, 3),
            "epochs_run": self.training.get("epochs_run"),
        }


def settings(temperature: float, alpha: float, sweep: bool) -> list[tuple[float, float]]:
    """The job's setting first, then the sweep's others."""
    chosen = [(temperature, alpha)]
    if sweep:
        chosen += [s for s in SWEEP if s != (temperature, alpha)]
    return chosen[:MAX_RUNS]


def fits_budget(runs: list[Run], spent_s: float, budget_s: float) -> bool:
    """Whether one more run of the slowest kind so far still ends within the budget."""
    slowest = max((run.seconds for run in runs), default=0.0)
    return spent_s + slowest <= budget_s


def choose(baseline: Run, distilled: list[Run]) -> tuple[Run, list[str]]:
    """The run to deliver and the warnings to show; accuracies must be measured (not None)."""
    best = max(distilled, key=lambda run: run.accuracy if run.accuracy is not None else -1.0)
    assert best.accuracy is not None and baseline.accuracy is not None
    if best.accuracy >= baseline.accuracy:
        warnings = (
            []
            if best.accuracy > baseline.accuracy
            else [
                f"distillation did not beat the baseline student: best distilled run {best.name} ties it at "
                f"{best.accuracy:.4f} top-1; the distilled student is delivered"
            ]
        )
        return best, warnings
    return baseline, [
        f"distillation did not beat the baseline student ({best.accuracy:.4f} best distilled "
        f"vs {baseline.accuracy:.4f} top-1 over {len(distilled)} run(s)); the baseline student, "
        f"trained on labels alone with the same budget and seed, is delivered"
    ]
