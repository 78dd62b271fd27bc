"""What the client CLI prints: the before/after metrics table, job rows, progress bars, JSON and errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from modelpress.client import Job

out = Console(highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.1f}%"


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f} ms"


def _int(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def metrics_table(metrics: dict[str, Any], title: str = "before / after") -> Table:
    """The before/after table of a job's metrics document (the same for server and --local runs)."""
    original, compressed = metrics.get("original") or {}, metrics.get("compressed") or {}
    fidelity = metrics.get("fidelity") or {}
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("original", justify="right")
    table.add_column("compressed", justify="right")
    table.add_column("change", justify="right")
    ratio = metrics.get("compression_ratio") or _ratio(original.get("size_bytes"), compressed.get("size_bytes"))
    table.add_row(
        "size",
        human_bytes(original.get("size_bytes")),
        human_bytes(compressed.get("size_bytes")),
        f"{ratio:.2f}x smaller" if ratio else "",
    )
    table.add_row("size (bytes)", _int(original.get("size_bytes")), _int(compressed.get("size_bytes")), "")
    table.add_row(
        "parameters",
        _int(original.get("parameters")),
        _int(compressed.get("parameters")),
        f"{compressed['parameters'] / original['parameters']:.2f}x"
        if original.get("parameters") and compressed.get("parameters")
        else "",
    )
    table.add_row(
        "nonzero parameters", _int(original.get("nonzero_parameters")), _int(compressed.get("nonzero_parameters")), ""
    )
    table.add_row("sparsity", _pct(original.get("sparsity")), _pct(compressed.get("sparsity")), "")
    speedup = metrics.get("speedup")
    where = f"batch {metrics.get('batch_size', '?')}, {metrics.get('device', '?')}"
    table.add_row(
        f"latency p50 ({where})",
        _ms(original.get("latency_ms_p50")),
        _ms(compressed.get("latency_ms_p50")),
        f"{speedup:.2f}x faster" if speedup and speedup >= 1 else (f"{1 / speedup:.2f}x slower" if speedup else ""),
    )
    table.add_row("latency p95", _ms(original.get("latency_ms_p95")), _ms(compressed.get("latency_ms_p95")), "")
    acc_o, acc_c = original.get("accuracy"), compressed.get("accuracy")
    table.add_row(
        "accuracy",
        _pct(acc_o),
        _pct(acc_c),
        f"{(acc_c - acc_o) * 100:+.2f} pt" if acc_o is not None and acc_c is not None else "",
    )
    sqnr = fidelity.get("sqnr_db")
    table.add_row(
        "fidelity: SQNR",
        "",
        "∞ dB" if sqnr is None and fidelity.get("output_mse") == 0 else ("–" if sqnr is None else f"{sqnr:.1f} dB"),
        "",
    )
    table.add_row("fidelity: top-1 agreement", "", _pct(fidelity.get("top1_agreement")), "")
    return table


def print_result(metrics: dict[str, Any], artifact: Path | None, title: str) -> None:
    out.print(metrics_table(metrics, title))
    for warning in metrics.get("warnings") or []:
        out.print(f"[yellow]warning:[/yellow] {warning}")
    if artifact is not None:
        out.print(f"artifact: {artifact} ({artifact.stat().st_size:,} bytes)")


class _Bar:
    """A rich progress bar on stderr: call it with (fraction, stage); `log` prints a line above it."""

    def __init__(self, progress: Progress, label: str) -> None:
        self.progress, self.task = progress, progress.add_task(label, total=1.0, stage="")

    def __call__(self, fraction: float, stage: str | None) -> None:
        self.progress.update(self.task, completed=max(0.0, min(1.0, fraction)), stage=(stage or "")[:60])

    def log(self, text: str) -> None:
        self.progress.console.print(text, markup=False)


@contextmanager
def progress_bar(label: str) -> Iterator[_Bar]:
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[stage]}"),
        console=err,
        transient=False,
    ) as progress:
        yield _Bar(progress, label)


def _job_row(job: Job) -> list[str]:
    metrics = job.metrics or {}
    method = ",".join(f"{s.get('method')}:{s.get('scheme')}" for s in job.spec.get("stages", []))
    ratio = metrics.get("compression_ratio")
    return [
        job.id,
        job.status,
        method,
        f"{job.progress:.0%}",
        f"{ratio:.2f}x" if ratio else "",
        (job.created_at or "")[:19],
    ]


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _fail(error: Exception) -> int:
    err.print(f"[red]error:[/red] {error}")
    return 1
