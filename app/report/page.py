"""The self-contained HTML job report: inline CSS, inline SVG charts, no external URL of any kind."""

from __future__ import annotations

import json
from datetime import datetime
from html import escape
from typing import Any

from app.report.charts import Chart
from app.report.content import before_after, search_view, speed_text, stage_label

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2330;margin:0;background:#f6f7f9}
main{max-width:1040px;margin:0 auto;padding:24px}
h1{font-size:21px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 8px}
.muted{color:#6b7385}code,pre{font-family:ui-monospace,Menlo,monospace;font-size:12.5px}
pre{background:#fff;border:1px solid #e2e5ec;padding:10px;overflow:auto}
table{border-collapse:collapse;background:#fff;border:1px solid #e2e5ec;margin:6px 0}
th,td{text-align:left;padding:5px 10px;border-bottom:1px solid #e2e5ec}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
thead th{font-size:12px;color:#6b7385;text-transform:uppercase;letter-spacing:.03em}
.warnings{background:#fff8e6;border:1px solid #f0d49b;border-left:5px solid #b7791f;padding:10px 16px;
border-radius:6px;margin:14px 0}.warnings li{margin:3px 0}
.error{background:#fdf1f1;border:1px solid #f3c9c9;border-left:5px solid #d64545;padding:10px 16px;border-radius:6px}
dl.headline{display:flex;gap:12px;flex-wrap:wrap;margin:14px 0}
dl.headline div{background:#fff;border:1px solid #e2e5ec;border-radius:8px;padding:8px 14px;min-width:130px}
dl.headline dt{color:#6b7385;font-size:12px}dl.headline dd{margin:2px 0 0;font-size:21px;font-weight:600}
figure.chart{background:#fff;border:1px solid #e2e5ec;border-radius:8px;padding:10px;margin:0 0 14px}
figure.chart figcaption{color:#6b7385;font-size:12px;margin-bottom:4px}figure.chart svg{max-width:100%;height:auto}
tr.met td:first-child{border-left:4px solid #1f9d55}tr.missed td:first-child{border-left:4px solid #d64545}
tr.chosen{background:#eef4ff}
"""


def _number(value: Any, key: str) -> str:
    if value is None:
        return "–"
    if key in ("size_bytes", "parameters", "nonzero_parameters"):
        return f"{int(value):,}"
    if key in ("sparsity", "accuracy", "top1_agreement"):
        return f"{value * 100:.2f}%"
    if key.startswith("latency"):
        return f"{value:.4f} ms"
    if key == "sqnr_db":
        return f"{value:.2f} dB"
    return escape(str(value))


def _cell(value: Any, key: str) -> str:
    raw = "" if value is None else f' data-value="{escape(json.dumps(value))}"'
    return f'<td class="num"{raw}>{_number(value, key)}</td>'


def _headline(metrics: dict[str, Any]) -> str:
    fidelity = metrics.get("fidelity") or {}
    items = [
        ("smaller", "compression_ratio", f"{metrics['compression_ratio']:.2f}×"),
        ("speed (p50)", "speedup", speed_text(metrics)),
        ("SQNR", "sqnr_db", _number(fidelity.get("sqnr_db"), "sqnr_db")),
        ("top-1 agreement", "top1_agreement", _number(fidelity.get("top1_agreement"), "top1_agreement")),
    ]
    return (
        '<dl class="headline">'
        + "".join(
            f'<div><dt>{label}</dt><dd id="{key.replace("_", "-")}">{text}</dd></div>' for label, key, text in items
        )
        + "</dl>"
    )


def _before_after_table(metrics: dict[str, Any]) -> str:
    rows = "".join(
        f'<tr data-metric="{key}"><th>{escape(label)}</th>{_cell(original, key)}{_cell(compressed, key)}'
        f"<td>{escape(change)}</td></tr>"
        for label, key, original, compressed, change in before_after(metrics)
    )
    return (
        '<table id="before-after"><thead><tr><th></th><th>original</th><th>compressed</th><th>change</th></tr>'
        f"</thead><tbody>{rows}</tbody></table>"
    )


def _trials_table(metrics: dict[str, Any]) -> str:
    search = search_view(metrics)
    if search is None:
        return ""
    chosen = (search.chosen or {}).get("candidate")
    body = "".join(
        f'<tr class="{escape(str(t.get("status")))}{" chosen" if t.get("candidate") == chosen else ""}">'
        f"<td>{escape(str(t.get('candidate')))}</td><td>{escape(str(t.get('status')))}</td>"
        f"{_cell(t.get('size_bytes'), 'size_bytes')}{_cell(t.get('accuracy'), 'accuracy')}"
        f"{_cell(t.get('sqnr_db'), 'sqnr_db')}<td>{escape(speed_text(t))}</td>{_cell(t.get('seconds'), 'seconds')}"
        f"<td>{escape(str(t.get('reason') or ''))}</td></tr>"
        for t in search.trials
    )
    return (
        f"<p>Result: <b>{escape(search.result)}</b>; objective {escape(search.objective)}; "
        f"chosen: <b>{escape(str(chosen))}</b>.</p>"
        '<table id="trials"><thead><tr><th>candidate</th><th>status</th><th>size (bytes)</th><th>accuracy</th>'
        f"<th>SQNR</th><th>speed vs original</th><th>seconds</th><th>note</th></tr></thead><tbody>{body}</tbody></table>"
    )


def _environment(job: dict[str, Any], metrics: dict[str, Any] | None) -> str:
    m = metrics or {}
    env = m.get("environment") or {}
    rows: list[tuple[str, Any]] = [
        ("device", m.get("device")),
        ("threads (latency)", m.get("threads")),
        ("batch size (latency)", m.get("batch_size")),
        ("eval batch size", m.get("eval_batch_size")),
        ("CPU", env.get("cpu")),
        ("logical CPUs", env.get("cpu_count")),
        ("GPU", env.get("gpu")),
        ("python", env.get("python")),
        ("platform", env.get("platform")),
        ("torch", (env.get("versions") or {}).get("torch") or m.get("torch_version")),
        *[(name, version) for name, version in (env.get("versions") or {}).items() if name != "torch"],
        ("artifact format (runtime)", (job.get("artifact") or {}).get("format")),
        ("artifact needs", ", ".join((job.get("artifact") or {}).get("requires") or []) or None),
        ("worker", job.get("worker_name")),
        ("wall time", _wall_time(job)),
    ]
    body = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in rows if v is not None)
    return f'<table id="environment"><tbody>{body}</tbody></table>'


def _wall_time(job: dict[str, Any]) -> str | None:
    started, finished = job.get("started_at"), job.get("finished_at")
    if not isinstance(started, datetime) or not isinstance(finished, datetime):
        return None
    return f"{(finished - started).total_seconds():.1f} s"


def _figure(chart: Chart) -> str:
    return (
        f'<figure class="chart" data-chart="{escape(chart.name)}"><figcaption>{escape(chart.title)}'
        f"</figcaption>{chart.svg}</figure>"
    )


def render(job: dict[str, Any], charts: list[Chart]) -> str:
    """The whole page. `job` holds id, status, spec, error, created/started/finished, worker_name,
    artifact (format, requires, size_bytes, sha256) and metrics (the document, or None)."""
    metrics = job.get("metrics")
    stages = " → ".join(stage_label(s) for s in job["spec"].get("stages") or [])
    parts = [
        f"<h1>ModelPress job report: <code>{escape(job['id'])}</code></h1>",
        f'<p class="muted">{escape(stages)} on model <code>{escape(job["spec"].get("model_id", ""))}</code>'
        f' · status <b id="status">{escape(job["status"])}</b>'
        f" · created {escape(str(job.get('created_at')))}</p>",
    ]
    if job.get("error"):
        error = job["error"]
        parts.append(f'<p class="error">{escape(str(error.get("error")))}: {escape(str(error.get("detail")))}</p>')
    warnings = list((metrics or {}).get("warnings") or [])
    for stage in (metrics or {}).get("stages") or []:
        warnings += [f"{stage_label(stage)}: {w}" for w in (stage.get("info") or {}).get("warnings") or []]
    if warnings:
        items = "".join(f"<li>{escape(str(w))}</li>" for w in warnings)
        parts.append(f'<section class="warnings" id="warnings"><b>Warnings</b><ul>{items}</ul></section>')
    if metrics:
        parts += [_headline(metrics), "<h2>Before / after</h2>", _before_after_table(metrics)]
        if search_view(metrics) is not None:
            parts += ["<h2>Search trials</h2>", _trials_table(metrics)]
    else:
        parts.append('<p class="muted">No measurements: the job did not succeed.</p>')
    if charts:
        parts.append("<h2>Charts</h2>")
        parts += [_figure(chart) for chart in charts]
    parts += [
        "<h2>Environment</h2>",
        _environment(job, metrics),
        "<h2>Spec</h2>",
        f'<pre id="spec">{escape(json.dumps(job["spec"], indent=2))}</pre>',
    ]
    if metrics:
        # the measured document itself, for anyone who wants the exact numbers; "<" escaped so it cannot end the tag
        document = json.dumps(metrics, indent=1, default=str).replace("<", "\\u003c")
        parts.append(f'<script type="application/json" id="metrics">{document}</script>')
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>ModelPress report {escape(job['id'])}</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{CSS}</style></head><body><main>{''.join(parts)}"
        '<p class="muted">Every number above was measured by the worker that ran the job; '
        "this page loads nothing from anywhere.</p></main></body></html>\n"
    )
