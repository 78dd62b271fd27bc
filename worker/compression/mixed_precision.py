"""Automatic mixed precision: quantize everything, then keep the fewest, most harmful layers in float.

`quantize` with `min_sqnr_db` or `max_accuracy_drop` lands here. The whole model is quantized with
the scheme's own backend and judged on the job's fidelity set (the figures the job reports). While
the bar does not hold, the most harmful layer still quantized (by the per-layer sensitivity table
of `worker.compression.sensitivity`) is put back in float, the model is quantized again and judged
again: every step is verified, none is estimated. The stage reports which layers stayed float and
what they cost against plain int8 in file size and latency.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from worker.compression import metrics as measure
from worker.compression.base import EngineError, StageContext
from worker.compression.sensitivity import Probe, layer_sensitivity, make_probe

if TYPE_CHECKING:
    from worker.compression.quantization import Backend
    from worker.compression.quantization.plan import _Done

BAR_OPTIONS = ("min_sqnr_db", "max_accuracy_drop")


@dataclass(frozen=True)
class Bar:
    """What the quantized model must meet against the float one; both bounds when both are given."""

    min_sqnr_db: float | None = None
    max_accuracy_drop: float | None = None

    def holds(self, sqnr_db: float | None, accuracy_drop: float | None) -> bool:
        # an SQNR of None means the outputs are identical
        if self.min_sqnr_db is not None and sqnr_db is not None and sqnr_db < self.min_sqnr_db:
            return False
        if self.max_accuracy_drop is not None:
            if accuracy_drop is None:
                raise EngineError("max_accuracy_drop needs an eval dataset with labels")
            if accuracy_drop > self.max_accuracy_drop + 1e-9:
                return False
        return True

    def describe(self) -> dict[str, float | None]:
        return {"min_sqnr_db": self.min_sqnr_db, "max_accuracy_drop": self.max_accuracy_drop}


@dataclass
class Search:
    bar: Bar
    float_layers: list[str]
    met: bool
    steps: list[dict[str, Any]]
    done: _Done  # the last backend result
    first: _Done  # the plain, everything-quantized result
    table: list[dict[str, Any]] = field(default_factory=list)


def glob_escape(name: str) -> str:
    """A skip_layers pattern that matches exactly this module name."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def keep_float_until(
    model: nn.Module,
    scheme: str,
    options: dict[str, Any],
    ctx: StageContext,
    bar: Bar,
    ranking: list[dict[str, Any]] | Callable[[], list[dict[str, Any]]],
    *,
    judge_probe: Probe,
    stop_at_first: bool = False,
) -> Search:
    """Quantize with `scheme`; while `bar` fails, put the next most harmful layer of `ranking` back in float.

    `ranking` is the sensitivity table (most harmful first) or a function computing it, called only
    when the fully quantized model misses the bar.
    """
    from worker.compression.quantization import backend_for

    backend = backend_for(scheme, ctx.kind)
    user_skip = list(options.get("skip_layers") or [])
    float_layers: list[str] = []
    steps: list[dict[str, Any]] = []
    order: list[str] | None = None
    table: list[dict[str, Any]] = []
    first = None
    while True:
        ctx.check_cancelled()
        done = backend.run(model, {**options, "skip_layers": user_skip + [glob_escape(n) for n in float_layers]}, ctx)
        if first is None:
            first = done
        sqnr, drop = judge_probe.judge(done.model)
        met = bar.holds(sqnr, drop) if not stop_at_first else True
        steps.append(
            {
                "float_layers": len(float_layers),
                "kept_float": float_layers[-1] if float_layers else None,
                "quantized_layers": len(done.plan.targets),
                "sqnr_db": sqnr,
                "accuracy_drop": drop,
            }
        )
        ctx.progress(
            min(0.95, 0.5 + 0.05 * len(steps)),
            f"{len(float_layers)} layers in float: {sqnr} dB" + ("" if met else " (bar not met)"),
        )
        if met:
            return Search(bar, float_layers, True, steps, done, first, table)
        if order is None:
            table = ranking() if callable(ranking) else ranking
            order = [row["layer"] for row in table]
        remaining = [name for name in order if name not in float_layers and name in done.plan.targets]
        if not remaining or len(done.plan.targets) <= 1:  # the next step would quantize nothing
            return Search(bar, float_layers, False, steps, done, first, table)
        float_layers.append(remaining[0])


def quantize_to_bar(
    model: nn.Module, scheme: str, backend: Backend, options: dict[str, Any], ctx: StageContext
) -> _Done:
    """The `quantize` stage with a bar: the fewest float layers that meet it, and their cost.

    Raises EngineError when even one quantized layer misses the bar: nothing is delivered that
    does not meet what the job asked for.
    """
    bar = Bar(options.get("min_sqnr_db"), options.get("max_accuracy_drop"))
    quantize_options = {k: v for k, v in options.items() if k not in BAR_OPTIONS}
    probe = make_probe(model, ctx)
    if bar.max_accuracy_drop is not None and probe.labels is None:
        raise EngineError("max_accuracy_drop needs an eval dataset with labels (eval_dataset_id)")

    def ranking() -> list[dict[str, Any]]:
        ctx.progress(0.2, "per-layer sensitivity")
        return layer_sensitivity(model, scheme, ctx, probe, quantize_options)

    search = keep_float_until(model, scheme, quantize_options, ctx, bar, ranking, judge_probe=probe)
    if not search.met:
        last = search.steps[-1]
        raise EngineError(
            f"{scheme}: no mix of float and int8 layers meets {bar.describe()}; with "
            f"{len(search.float_layers)} layers in float the model reached {last['sqnr_db']} dB "
            f"SQNR and a top-1 drop of {last['accuracy_drop']}"
        )
    done = search.done
    plain, mixed = _cost(search.first, backend, ctx), _cost(done, backend, ctx)
    plain.update(sqnr_db=search.steps[0]["sqnr_db"], accuracy_drop=search.steps[0]["accuracy_drop"])
    mixed.update(sqnr_db=search.steps[-1]["sqnr_db"], accuracy_drop=search.steps[-1]["accuracy_drop"])
    done.info.update(
        {
            "float_layers": search.float_layers,
            "mixed_precision": {
                "bar": bar.describe(),
                "met": True,
                "probe_samples": int(probe.inputs.shape[0]),
                "plain": plain,
                "mixed": mixed,
                "size_cost": round(mixed["size_bytes"] / plain["size_bytes"], 4),
                "latency_cost": (
                    round(mixed["latency_ms_p50"] / plain["latency_ms_p50"], 4) if plain["latency_ms_p50"] else None
                ),
                "steps": search.steps,
            },
        }
    )
    if search.table:
        done.info["sensitivity"] = search.table
    return done


def _cost(done: _Done, backend: Backend, ctx: StageContext) -> dict[str, Any]:
    """The file size (saved as the artifact would be by default) and latency of one variant."""
    from worker.compression.io import default_output_format, save_artifact

    output_format = default_output_format(done.kind, backend.output_format)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "variant"
        save_artifact(done.model, done.kind, output_format, path, ctx.example_input)
        size = path.stat().st_size
    latency = measure.measure_latency(done.model, ctx.example_input, threads=1)
    return {"size_bytes": size, "latency_ms_p50": latency["latency_ms_p50"], "threads": 1}
