"""What a job report shows, read from the job's metrics document and events. No plotting, no HTML.

Every figure comes from the metrics the worker measured (worker/compression/pipeline.py and the
stages' `info`); nothing here computes a new measurement. Keys the report reads:

- `original` / `compressed` / `fidelity` / `compression_ratio` / `speedup` / `warnings`: the before/after table.
- `stages[i].info.layers` rows with `sparsity`: per-layer zeros of a pruning stage;
  `layers` (top level): per-layer zeros of the delivered model.
- `stages[i].info.quantized_layers` / `skipped_layers` / `left_float` with the stage's scheme,
  or a codebook stage's `bits` and `layers`: per-layer weight bit widths.
- `pruning_sensitivity` (top level or in a stage's info): rows `{"layer", "results": [{"amount",
  "sqnr_db", "accuracy_drop"}]}`, most harmful first.
- `sensitivity` (top level or in a stage's info): a list of rows, or `{"layers": [...]}`, each
  `{"layer": name, "sqnr_db": dB, "accuracy_drop": fraction?}` (whole-model fidelity with only that
  layer compressed), most harmful first.
- a search stage's `trials`, `chosen`, `constraints`, `baseline_accuracy`, `original_size_bytes`.
- `epoch` events (`epoch`, `loss`, `val_loss`, `val_accuracy`, `lr`, optional `run`) and `trial` events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Bits per stored weight of each quantization scheme's quantized layers (the scheme's definition).
SCHEME_WEIGHT_BITS = {
    "dynamic_int8": 8,
    "static_int8": 8,
    "int8_weight_only": 8,
    "int8_dynamic": 8,
    "qat_int8": 8,
    "int4_weight_only": 4,
    "float8": 8,
    "fp16": 16,
    "bf16": 16,
}
FLOAT_BITS = 32  # layers a quantize stage leaves alone keep the float32 weights the engine works in


@dataclass
class LayerBits:
    layer: str
    bits: float
    kept_float: bool
    note: str


@dataclass
class LayerSparsity:
    layer: str
    sparsity: float
    targeted: bool | None = None


@dataclass
class SparsityTable:
    title: str
    rows: list[LayerSparsity]


@dataclass
class TrainingRun:
    label: str
    epochs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class SearchView:
    objective: str
    result: str
    y_key: str  # "accuracy" or "sqnr_db"
    bar: float | None
    baseline_accuracy: float | None
    original_size_bytes: int | None
    trials: list[dict[str, Any]]
    chosen: dict[str, Any] | None

    def plotted(self) -> list[dict[str, Any]]:
        """Trials with a measured size and y value: one point each on the chart."""
        return [t for t in self.trials if t.get("size_bytes") is not None and t.get(self.y_key) is not None]

    def pareto(self) -> list[dict[str, Any]]:
        """Plotted trials no other trial beats on both size (smaller) and y (higher), by size."""
        points = sorted(self.plotted(), key=lambda t: (t["size_bytes"], -t[self.y_key]))
        front: list[dict[str, Any]] = []
        for trial in points:
            if not front or trial[self.y_key] > front[-1][self.y_key]:
                front.append(trial)
        return front


def stage_label(stage: dict[str, Any]) -> str:
    return f"{stage.get('method')}:{stage.get('scheme')}"


def search_view(metrics: dict[str, Any] | None) -> SearchView | None:
    for stage in (metrics or {}).get("stages") or []:
        info = stage.get("info") or {}
        if stage.get("method") != "search" or not isinstance(info.get("trials"), list):
            continue
        constraints = info.get("constraints") or {}
        baseline = info.get("baseline_accuracy")
        by_accuracy = constraints.get("max_accuracy_drop") is not None and any(
            t.get("accuracy") is not None for t in info["trials"]
        )
        if by_accuracy:
            bar = baseline - constraints["max_accuracy_drop"] if baseline is not None else None
        else:
            bar = constraints.get("min_sqnr_db")
        return SearchView(
            objective=str(info.get("objective", "size")),
            result=str(info.get("result", "")),
            y_key="accuracy" if by_accuracy else "sqnr_db",
            bar=bar,
            baseline_accuracy=baseline,
            original_size_bytes=info.get("original_size_bytes"),
            trials=list(info["trials"]),
            chosen=info.get("chosen"),
        )
    return None


def sparsity_tables(metrics: dict[str, Any] | None) -> list[SparsityTable]:
    """Per-stage pruning tables; else the delivered model's own table when it holds any zeros."""
    tables = []
    for index, stage in enumerate((metrics or {}).get("stages") or []):
        rows = (stage.get("info") or {}).get("layers")
        if isinstance(rows, list) and rows and all("sparsity" in r and "layer" in r for r in rows):
            tables.append(
                SparsityTable(
                    f"Stage {index + 1} ({stage_label(stage)}): zeros per layer",
                    [LayerSparsity(str(r["layer"]), float(r["sparsity"]), r.get("targeted")) for r in rows],
                )
            )
    final = (metrics or {}).get("layers")
    if not tables and isinstance(final, list) and any(float(r.get("sparsity") or 0) > 0 for r in final):
        tables.append(
            SparsityTable(
                "Delivered model: zeros per layer",
                [LayerSparsity(str(r["layer"]), float(r["sparsity"])) for r in final],
            )
        )
    return tables


def layer_bits(metrics: dict[str, Any] | None) -> tuple[str, list[LayerBits]] | None:
    """Weight bit widths per layer of the last quantize / codebook stage, when it names its layers."""
    for index, stage in reversed(list(enumerate((metrics or {}).get("stages") or []))):
        info = stage.get("info") or {}
        scheme = str(stage.get("scheme"))
        title = f"Stage {index + 1} ({stage_label(stage)}): bits per weight"
        if stage.get("method") == "quantize" and scheme in SCHEME_WEIGHT_BITS and "quantized_layers" in info:
            bits = SCHEME_WEIGHT_BITS[scheme]
            rows = [LayerBits(name, bits, False, scheme) for name in info.get("quantized_layers") or []]
            rows += [
                LayerBits(name, FLOAT_BITS, True, "skipped (skip_layers)") for name in info.get("skipped_layers") or []
            ]
            rows += [
                LayerBits(name, FLOAT_BITS, True, f"left float: {why}")
                for name, why in (info.get("left_float") or {}).items()
            ]
            if rows:
                return title, rows
        if stage.get("method") == "encode" and isinstance(info.get("layers"), list) and info.get("bits"):
            rows = [
                LayerBits(str(r["layer"]), float(r.get("bits_per_weight") or info["bits"]), False, "codebook index")
                for r in info["layers"]
            ]
            rows += [
                LayerBits(str(s["layer"]), FLOAT_BITS, True, str(s.get("reason", "not encoded")))
                for s in info.get("skipped") or []
            ]
            if rows:
                return title, rows
    return None


def sensitivity_rows(metrics: dict[str, Any] | None) -> list[dict[str, Any]]:
    candidates: list[Any] = [(metrics or {}).get("sensitivity")]
    candidates += [(s.get("info") or {}).get("sensitivity") for s in (metrics or {}).get("stages") or []]
    for found in candidates:
        rows = found.get("layers") if isinstance(found, dict) else found
        if isinstance(rows, list) and rows and all(isinstance(r, dict) and "layer" in r for r in rows):
            if any(r.get("sqnr_db") is not None or r.get("accuracy_drop") is not None for r in rows):
                return rows
    return []


def pruning_sensitivity_rows(metrics: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The per-layer pruning table of `analyze/sensitivity` with `pruning: true`: rows with `results` per amount."""
    candidates: list[Any] = [(metrics or {}).get("pruning_sensitivity")]
    candidates += [(s.get("info") or {}).get("pruning_sensitivity") for s in (metrics or {}).get("stages") or []]
    for rows in candidates:
        if isinstance(rows, list) and rows and all(isinstance(r, dict) and "layer" in r for r in rows):
            if all(isinstance(r.get("results"), list) for r in rows):
                return rows
    return []


def training_runs(events: list[tuple[str, dict[str, Any]]]) -> list[TrainingRun]:
    """Split the job's epoch events into fits: a new fit starts when the epoch count restarts, the
    `run` label changes, or a search trial ends (its fine-tuning epochs come before its `trial` event)."""
    runs: list[TrainingRun] = []
    current: TrainingRun | None = None
    trial_epochs: list[TrainingRun] = []
    for kind, data in events:
        if kind == "trial":
            for run in trial_epochs:
                run.label = f"trial: {data.get('candidate')}"
            trial_epochs, current = [], None
            continue
        if kind != "epoch" or not isinstance(data.get("epoch"), int | float):
            continue
        label = str(data["run"]) if data.get("run") is not None else None
        restart = (
            current is None
            or data["epoch"] <= current.epochs[-1]["epoch"]
            or (label is not None and label != current.label)
        )
        if restart:
            current = TrainingRun(label or f"fit {len(runs) + 1}")
            runs.append(current)
            trial_epochs.append(current)
        assert current is not None
        current.epochs.append(data)
    return runs


def speed_text(metrics: dict[str, Any]) -> str:
    """The speed change as measured: a ratio with its interval only outside the noise, else "no measurable change".

    Jobs measured before the verdict existed (no speed_verdict) show their bare ratio."""
    speedup = metrics.get("speedup")
    if speedup is None:
        return "–"
    if metrics.get("speed_verdict") == "no measurable change":
        return "no measurable change"
    low, high = metrics.get("speedup_low"), metrics.get("speedup_high")
    spread = f" ({low:.2f}–{high:.2f})" if low is not None and high is not None else ""
    return f"{speedup:.2f}× faster{spread}" if speedup >= 1 else f"{1 / speedup:.2f}× slower{spread}"


def before_after(metrics: dict[str, Any]) -> list[tuple[str, str, Any, Any, str]]:
    """(label, key, original, compressed, change) rows; values are the raw measured numbers."""
    o, c, f = metrics.get("original") or {}, metrics.get("compressed") or {}, metrics.get("fidelity") or {}
    ratio = metrics.get("compression_ratio")
    speed = speed_text(metrics) if metrics.get("speedup") else ""
    accuracy_change = ""
    if o.get("accuracy") is not None and c.get("accuracy") is not None:
        accuracy_change = f"{(c['accuracy'] - o['accuracy']) * 100:+.2f} points"
    return [
        (
            "size (bytes)",
            "size_bytes",
            o.get("size_bytes"),
            c.get("size_bytes"),
            f"{ratio:.2f}× smaller" if ratio else "",
        ),
        ("parameters", "parameters", o.get("parameters"), c.get("parameters"), ""),
        ("nonzero parameters", "nonzero_parameters", o.get("nonzero_parameters"), c.get("nonzero_parameters"), ""),
        ("sparsity", "sparsity", o.get("sparsity"), c.get("sparsity"), ""),
        (
            f"latency p50 (batch {metrics.get('batch_size')}, {metrics.get('device')})",
            "latency_ms_p50",
            o.get("latency_ms_p50"),
            c.get("latency_ms_p50"),
            speed,
        ),
        ("latency p95", "latency_ms_p95", o.get("latency_ms_p95"), c.get("latency_ms_p95"), ""),
        ("accuracy", "accuracy", o.get("accuracy"), c.get("accuracy"), accuracy_change),
        ("fidelity: SQNR (dB)", "sqnr_db", None, f.get("sqnr_db"), ""),
        ("fidelity: top-1 agreement", "top1_agreement", None, f.get("top1_agreement"), ""),
    ]


def compare_row(job_id: str, status: str, spec: dict[str, Any], metrics: dict[str, Any] | None) -> dict[str, Any]:
    """One job's headline figures for the compare view (None where the job did not measure it)."""
    m = metrics or {}
    o, c, f = m.get("original") or {}, m.get("compressed") or {}, m.get("fidelity") or {}
    accuracy_drop = None
    if o.get("accuracy") is not None and c.get("accuracy") is not None:
        accuracy_drop = round(o["accuracy"] - c["accuracy"], 6)
    return {
        "job_id": job_id,
        "status": status,
        "stages": " → ".join(stage_label(s) for s in spec.get("stages") or []),
        "size_bytes": c.get("size_bytes"),
        "original_size_bytes": o.get("size_bytes"),
        "compression_ratio": m.get("compression_ratio"),
        "latency_ms_p50": c.get("latency_ms_p50"),
        "original_latency_ms_p50": o.get("latency_ms_p50"),
        "speedup": m.get("speedup"),
        "speed_verdict": m.get("speed_verdict"),
        "sqnr_db": f.get("sqnr_db"),
        "top1_agreement": f.get("top1_agreement"),
        "accuracy": c.get("accuracy"),
        "original_accuracy": o.get("accuracy"),
        "accuracy_drop": accuracy_drop,
        "sparsity": c.get("sparsity"),
        "warnings": list(m.get("warnings") or []),
    }
