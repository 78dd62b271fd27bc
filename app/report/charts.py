"""The report's charts: matplotlib figures written as standalone SVG text.

Figures are made with the object API (no pyplot state), so concurrent requests do not share a
figure. Text stays text (`svg.fonttype: none`) and is never parsed as mathtext, so a layer named
`a$b` prints as it is. Each chart marks what a test or a reader looks for with an SVG id (gid):
`trial-points`, `pareto-front`, `bar`, `chosen-trial`, `layer-bar-<i>`, `prune-bar-<layer>-<amount>`,
`compare-points`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before any figure: never a GUI backend in a server
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from app.report.content import LayerBits, SearchView, SparsityTable, TrainingRun  # noqa: E402

STYLE = {
    "svg.fonttype": "none",
    "text.parse_math": False,
    "svg.hashsalt": "modelpress",
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e6e8ee",
    "grid.linewidth": 0.6,
    "axes.edgecolor": "#9aa3b5",
}
ACCENT, INK, OK, BAD, MUTED = "#2f6fed", "#1d2330", "#1f9d55", "#d64545", "#a9b3c6"


@dataclass
class Chart:
    name: str
    title: str
    svg: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "title": self.title, "svg": self.svg}


def _svg(figure: Figure) -> str:
    buffer = io.StringIO()
    with matplotlib.rc_context(STYLE):  # type: ignore[arg-type]  # svg.* settings are read when the file is written
        figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and DOCTYPE: the SVG is inlined in HTML


def _kib(size: float) -> float:
    return size / 1024


def _bars(
    labels: list[str], values: list[float], colors: list[str], xlabel: str, xmax: float, value_text: list[str]
) -> Figure:
    with matplotlib.rc_context(STYLE):  # type: ignore[arg-type]  # the stubs want literal rc keys
        figure = Figure(figsize=(6.4, 0.9 + 0.28 * len(labels)))
        axes = figure.add_subplot()
        positions = list(range(len(labels)))
        bars = axes.barh(positions, values, color=colors, height=0.7)
        for index, bar in enumerate(bars):
            bar.set_gid(f"layer-bar-{index}")
        axes.set_yticks(positions, labels)
        axes.invert_yaxis()
        axes.set_xlim(0, xmax * 1.18)
        axes.set_xlabel(xlabel)
        axes.grid(axis="y", visible=False)
        for position, value, text in zip(positions, values, value_text):
            axes.text(value + xmax * 0.01, position, text, va="center", color=INK, fontsize=8)
    return figure


def layer_sparsity_chart(table: SparsityTable) -> Chart:
    rows = table.rows
    colors = [MUTED if r.targeted is False else ACCENT for r in rows]
    figure = _bars(
        [r.layer for r in rows],
        [r.sparsity * 100 for r in rows],
        colors,
        "zeros in the weight (%); grey: not targeted",
        100,
        [f"{r.sparsity * 100:.1f}%" for r in rows],
    )
    return Chart("layer-sparsity", table.title, _svg(figure))


def layer_bits_chart(title: str, rows: list[LayerBits]) -> Chart:
    colors = [MUTED if r.kept_float else ACCENT for r in rows]
    text = [f"float ({r.note})" if r.kept_float else f"{r.bits:g} bits ({r.note})" for r in rows]
    figure = _bars(
        [r.layer for r in rows],
        [r.bits for r in rows],
        colors,
        "bits per stored weight; grey: kept in float (drawn at 32)",
        32,
        text,
    )
    return Chart("layer-bits", title, _svg(figure))


def sensitivity_chart(rows: list[dict[str, Any]]) -> Chart:
    by_sqnr = any(r.get("sqnr_db") is not None for r in rows)
    key = "sqnr_db" if by_sqnr else "accuracy_drop"
    shown = [r for r in rows if r.get(key) is not None]
    values = [float(r[key]) if by_sqnr else float(r[key]) * 100 for r in shown]
    text = [f"{v:.1f} dB" if by_sqnr else f"{v:+.2f} points" for v in values]
    xlabel = (
        "whole-model SQNR with only this layer compressed (dB; lower is more harmful)"
        if by_sqnr
        else "accuracy drop with only this layer compressed (points)"
    )
    figure = _bars(
        [str(r["layer"]) for r in shown],
        [max(v, 0.0) for v in values],
        [ACCENT] * len(shown),
        xlabel,
        max(values + [1.0]),
        text,
    )
    return Chart("sensitivity", "Per-layer sensitivity", _svg(figure))


def pruning_sensitivity_chart(rows: list[dict[str, Any]]) -> Chart:
    """Grouped bars: per layer, the whole model's SQNR (or top-1 drop) at each pruning amount."""
    amounts = sorted({float(r["amount"]) for row in rows for r in row["results"]})
    by_sqnr = any(r.get("sqnr_db") is not None for row in rows for r in row["results"])
    key = "sqnr_db" if by_sqnr else "accuracy_drop"
    scale = 1.0 if by_sqnr else 100.0
    shades = ["#9dbcf7", "#5f8ff2", ACCENT, "#1c4fb8", "#123578"]
    with matplotlib.rc_context(STYLE):  # type: ignore[arg-type]  # the stubs want literal rc keys
        figure = Figure(figsize=(6.4, 1.1 + 0.22 * len(rows) * len(amounts)))
        axes = figure.add_subplot()
        height = 0.8 / max(1, len(amounts))
        for slot, amount in enumerate(amounts):
            values = []
            for row in rows:
                found = [r.get(key) for r in row["results"] if float(r["amount"]) == amount]
                values.append(max(0.0, float(found[0]) * scale) if found and found[0] is not None else 0.0)
            positions = [index + (slot - (len(amounts) - 1) / 2) * height for index in range(len(rows))]
            bars = axes.barh(
                positions, values, height=height, color=shades[slot % len(shades)], label=f"{amount:.0%} pruned"
            )
            for index, bar in enumerate(bars):
                bar.set_gid(f"prune-bar-{index}-{slot}")
        axes.set_yticks(range(len(rows)), [str(r["layer"]) for r in rows])
        axes.invert_yaxis()
        axes.set_xlabel(
            "whole-model SQNR with only this layer pruned (dB; lower is more harmful)"
            if by_sqnr
            else "accuracy drop with only this layer pruned (points)"
        )
        axes.grid(axis="y", visible=False)
        axes.legend(loc="lower right", fontsize=8)
    return Chart("pruning-sensitivity", "Per-layer pruning sensitivity", _svg(figure))


def trials_chart(search: SearchView) -> Chart:
    points, front, y = search.plotted(), search.pareto(), search.y_key
    ylabel = "accuracy on the eval set (%)" if y == "accuracy" else "SQNR against the original (dB)"
    scale = 100.0 if y == "accuracy" else 1.0
    with matplotlib.rc_context(STYLE):  # type: ignore[arg-type]  # the stubs want literal rc keys
        figure = Figure(figsize=(6.8, 4.2))
        axes = figure.add_subplot()
        colors = [OK if t["status"] == "met" else BAD for t in points]
        dots = axes.scatter(
            [_kib(t["size_bytes"]) for t in points],
            [t[y] * scale for t in points],
            c=colors,
            s=36,
            zorder=3,
            edgecolors="white",
            linewidths=0.6,
        )
        dots.set_gid("trial-points")
        if front:
            (line,) = axes.step(
                [_kib(t["size_bytes"]) for t in front],
                [t[y] * scale for t in front],
                where="post",
                color=INK,
                linewidth=1,
                alpha=0.6,
                zorder=2,
                label="Pareto front",
            )
            line.set_gid("pareto-front")
        if search.bar is not None:
            bar = axes.axhline(
                search.bar * scale,
                color=BAD,
                linestyle="--",
                linewidth=1,
                label=f"bar: {search.bar * scale:.2f}" + (" %" if y == "accuracy" else " dB"),
            )
            bar.set_gid("bar")
        if search.original_size_bytes and y == "accuracy" and search.baseline_accuracy is not None:
            original = axes.scatter(
                [_kib(search.original_size_bytes)],
                [search.baseline_accuracy * scale],
                marker="D",
                color=INK,
                s=40,
                zorder=4,
                label="original",
            )
            original.set_gid("original-point")
        elif search.original_size_bytes:
            axes.axvline(
                _kib(search.original_size_bytes), color=INK, linewidth=0.8, linestyle=":", label="original size"
            )
        chosen = search.chosen
        if chosen and chosen.get("size_bytes") is not None and chosen.get(y) is not None:
            star = axes.scatter(
                [_kib(chosen["size_bytes"])],
                [chosen[y] * scale],
                marker="*",
                s=260,
                facecolors="none",
                edgecolors=ACCENT,
                linewidths=1.6,
                zorder=5,
                label=f"chosen: {chosen.get('candidate')}",
            )
            star.set_gid("chosen-trial")
        for trial in points:
            axes.annotate(
                str(trial.get("candidate")),
                (_kib(trial["size_bytes"]), trial[y] * scale),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=7,
                color="#6b7385",
            )
        axes.scatter([], [], color=OK, s=20, label="met the bar")
        axes.scatter([], [], color=BAD, s=20, label="missed")
        axes.set_xlabel("artifact size (KiB)")
        axes.set_ylabel(ylabel)
        axes.legend(fontsize=7, loc="best", framealpha=0.85)
    return Chart(
        "trials",
        f"Search trials: size vs {'accuracy' if y == 'accuracy' else 'SQNR'} "
        f"({len(points)} measured of {len(search.trials)})",
        _svg(figure),
    )


def training_chart(runs: list[TrainingRun]) -> Chart:
    """Loss, validation accuracy and learning rate over the job's epochs, fits one after another."""
    with matplotlib.rc_context(STYLE):  # type: ignore[arg-type]  # the stubs want literal rc keys
        figure = Figure(figsize=(7.2, 5.6))
        loss_axes, accuracy_axes, lr_axes = figure.subplots(3, 1, sharex=True)
        offset = 0
        labels = list(dict.fromkeys(run.label for run in runs))  # fits of one trial or run share a colour
        for index, run in enumerate(runs):
            xs = [offset + i + 1 for i in range(len(run.epochs))]
            color = f"C{labels.index(run.label) % 10}"
            first_of_label = all(other.label != run.label for other in runs[:index])
            loss_axes.plot(
                xs,
                [e.get("loss") for e in run.epochs],
                marker="o",
                markersize=2.5,
                color=color,
                label=run.label if first_of_label else None,
            )
            if any(e.get("val_loss") is not None for e in run.epochs):
                loss_axes.plot(xs, [e.get("val_loss") for e in run.epochs], linestyle="--", color=color, alpha=0.6)
            if any(e.get("val_accuracy") is not None for e in run.epochs):
                accuracy_axes.plot(
                    xs,
                    [None if e.get("val_accuracy") is None else e["val_accuracy"] * 100 for e in run.epochs],
                    marker="o",
                    markersize=2.5,
                    color=color,
                )
            if any(e.get("lr") is not None for e in run.epochs):
                lr_axes.plot(xs, [e.get("lr") for e in run.epochs], color=color)
            if index:
                for axes in (loss_axes, accuracy_axes, lr_axes):
                    axes.axvline(offset + 0.5, color="#c8cdd8", linewidth=0.8)
            offset += len(run.epochs)
        loss_axes.set_ylabel("loss (solid: train,\ndashed: validation)")
        accuracy_axes.set_ylabel("validation\naccuracy (%)")
        lr_axes.set_ylabel("learning rate")
        lr_axes.set_xlabel("epoch (fits one after another)")
        lr_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(labels) <= 12:
            loss_axes.legend(fontsize=7, loc="upper right", framealpha=0.85)
    total = sum(len(r.epochs) for r in runs)
    return Chart("training", f"Training: {total} epochs in {len(runs)} fit(s)", _svg(figure))


def compare_chart(rows: list[dict[str, Any]]) -> Chart:
    """Size and latency against accuracy (or SQNR when no job has labels), one point per job."""
    measured = [r for r in rows if r.get("size_bytes") is not None]
    use_accuracy = any(r.get("accuracy") is not None for r in measured)
    key, scale = ("accuracy", 100.0) if use_accuracy else ("sqnr_db", 1.0)
    plotted = [r for r in measured if r.get(key) is not None]
    ylabel = "accuracy (%)" if use_accuracy else "SQNR against the original (dB)"
    with matplotlib.rc_context(STYLE):  # type: ignore[arg-type]  # the stubs want literal rc keys
        figure = Figure(figsize=(8.6, 3.8))
        size_axes, latency_axes = figure.subplots(1, 2, sharey=True)
        for axes, x_key, xlabel, to_x in (
            (size_axes, "size_bytes", "artifact size (KiB)", _kib),
            (latency_axes, "latency_ms_p50", "latency p50 (ms)", float),
        ):
            shown = [r for r in plotted if r.get(x_key) is not None]
            dots = axes.scatter(
                [to_x(r[x_key]) for r in shown],
                [r[key] * scale for r in shown],
                c=[f"C{plotted.index(r) % 10}" for r in shown],
                s=40,
                zorder=3,
            )
            dots.set_gid("compare-points" if axes is size_axes else "compare-points-latency")
            for r in shown:
                axes.annotate(
                    r["job_id"][-6:],
                    (to_x(r[x_key]), r[key] * scale),
                    textcoords="offset points",
                    xytext=(5, 4),
                    fontsize=7,
                    color="#6b7385",
                )
            axes.set_xlabel(xlabel)
        originals = [r for r in plotted if r.get("original_size_bytes") is not None]
        if use_accuracy and originals and originals[0].get("original_accuracy") is not None:
            first = originals[0]
            size_axes.scatter(
                [_kib(first["original_size_bytes"])],
                [first["original_accuracy"] * scale],
                marker="D",
                color=INK,
                s=36,
                zorder=4,
                label="original",
            )
            size_axes.legend(fontsize=7)
        size_axes.set_ylabel(ylabel)
    return Chart("compare", f"{len(plotted)} jobs: size and latency vs {ylabel.split(' (')[0]}", _svg(figure))
