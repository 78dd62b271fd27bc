"""Job reports and comparisons: charts (matplotlib, SVG) and a self-contained HTML page.

Imports matplotlib and numpy, never torch: it runs in the API process.
"""

from __future__ import annotations

from typing import Any

from app.report import content


def job_charts(metrics: dict[str, Any] | None, events: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    """Every chart the job's measurements support, in reading order."""
    from app.report import charts

    made: list[charts.Chart] = []
    search = content.search_view(metrics)
    if search is not None and search.plotted():
        made.append(charts.trials_chart(search))
    made += [charts.layer_sparsity_chart(table) for table in content.sparsity_tables(metrics)]
    bits = content.layer_bits(metrics)
    if bits is not None:
        made.append(charts.layer_bits_chart(*bits))
    sensitivity = content.sensitivity_rows(metrics)
    if sensitivity:
        made.append(charts.sensitivity_chart(sensitivity))
    pruning = content.pruning_sensitivity_rows(metrics)
    if pruning:
        made.append(charts.pruning_sensitivity_chart(pruning))
    runs = content.training_runs(events)
    if runs:
        made.append(charts.training_chart(runs))
    return made


def report_html(job: dict[str, Any], events: list[tuple[str, dict[str, Any]]]) -> str:
    from app.report import page

    return page.render(job, job_charts(job.get("metrics"), events))


def compare_chart(rows: list[dict[str, Any]]) -> Any:
    from app.report import charts

    return charts.compare_chart(rows)
