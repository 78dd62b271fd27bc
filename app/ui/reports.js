// ModelPress dashboard: report charts, the HTML report, and the compare view.
// The charts are the job report's own SVGs (matplotlib, rendered by the API), so the page and the
// report always show the same pictures; nothing is loaded from outside this server.
// Uses h(), api(), show(), state, fmt*() and badge() from app.js (loaded after this file).
"use strict";

// Parse a chart's standalone <svg> text into a node of this document (no script runs: SVG from
// DOMParser is inert, and matplotlib writes none).
function svgNode(text) {
  const parsed = new DOMParser().parseFromString(text, "image/svg+xml");
  const root = parsed.documentElement;
  if (!root || root.nodeName !== "svg") return h("p", { class: "error" }, "a chart could not be read");
  root.removeAttribute("width");
  root.removeAttribute("height");
  root.setAttribute("class", "report-svg");
  return document.importNode(root, true);
}

function chartFigure(chart) {
  return h("figure", { class: "chart-box report-chart", "data-chart": chart.name },
    h("figcaption", {}, chart.title), svgNode(chart.svg));
}

// The job page's charts: trials, per-layer sparsity / bits / sensitivity, training curves.
async function jobChartsSection(job) {
  const { charts } = await api(`/v1/jobs/${encodeURIComponent(job.id)}/charts`);
  const nodes = charts.map(chartFigure);
  if (!charts.some((c) => c.name === "layer-sparsity")) {
    nodes.push(h("p", { class: "muted", "data-chart": "layer-sparsity-none" },
      "No per-layer sparsity in this job: nothing was pruned."));
  }
  if (!charts.length && !TERMINAL.includes(job.status)) {
    nodes.unshift(h("p", { class: "muted" }, "Charts appear when the job ends."));
  }
  return h("div", { id: "job-charts" }, nodes);
}

// Open the self-contained report in a new tab (fetched with the key, shown from a blob URL).
async function openReport(job, download) {
  const response = await fetch(`/v1/jobs/${encodeURIComponent(job.id)}/report`, { headers: authHeaders() });
  if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => ({})));
  const url = URL.createObjectURL(new Blob([await response.text()], { type: "text/html" }));
  if (download) {
    const link = h("a", { href: url, download: `${job.id}-report.html` });
    document.body.append(link);
    link.click();
    link.remove();
  } else {
    window.open(url, "_blank", "noopener");
  }
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

function reportButtons(job) {
  const fail = (e) => view().append(errorBox(e));
  return [h("button", { id: "open-report", class: "quiet", onclick: () => openReport(job, false).catch(fail) },
    "Open report"),
  h("button", { id: "save-report", class: "quiet", onclick: () => openReport(job, true).catch(fail) },
    "Save report (HTML)")];
}

// On the model page: a checkbox per finished job and a button to compare the chosen ones.
function compareControls(modelId, jobs) {
  const done = jobs.filter((j) => j.status === "succeeded");
  const button = h("button", { id: "compare-selected", disabled: true, onclick: () => {
    const ids = [...document.querySelectorAll("input.compare-pick:checked")].map((c) => c.value);
    location.hash = `#/models/${encodeURIComponent(modelId)}/compare?ids=${ids.map(encodeURIComponent).join(",")}`;
  } }, "Compare selected");
  const refresh = () => {
    const picked = document.querySelectorAll("input.compare-pick:checked").length;
    button.disabled = picked < 2;
    button.textContent = picked ? `Compare selected (${picked})` : "Compare selected";
  };
  const pick = (job) => (job.status === "succeeded"
    ? h("input", { type: "checkbox", class: "compare-pick", value: job.id, "aria-label": `compare ${job.id}`,
                   onchange: refresh }) : "");
  return { button, pick, available: done.length >= 2 };
}

async function compareView(modelId, query) {
  const gen = state.gen;
  const ids = new URLSearchParams(query).get("ids") || "";
  const q = new URLSearchParams({ chart: "true" });
  if (ids) q.set("ids", ids);
  const result = await api(`/v1/models/${encodeURIComponent(modelId)}/jobs/compare?${q}`);
  const rows = result.rows;
  const first = rows.find((r) => r.original_size_bytes !== null) || {};
  const cell = (text, value) => h("td", { class: "num", "data-value": value === null || value === undefined ? "" : value }, text);
  show(gen, h("section", { id: "compare", "data-model": modelId },
    h("h1", {}, `Compare ${rows.length} jobs of `, h("a", { href: `#/models/${modelId}` }, h("code", {}, modelId))),
    h("p", { class: "muted" }, `Original: ${fmtBytes(first.original_size_bytes)}, latency ${fmtMs(first.original_latency_ms_p50)}, ` +
      `accuracy ${fmtPct(first.original_accuracy)}.`),
    h("table", { class: "list", id: "compare-table" },
      h("thead", {}, h("tr", {}, ["job", "stages", "status", "size", "ratio", "latency p50", "speedup", "SQNR",
        "top-1 agr.", "accuracy", "Δ accuracy", "sparsity", "warnings"].map((c) => h("th", {}, c)))),
      h("tbody", {}, rows.map((r) => h("tr", { "data-job": r.job_id },
        h("td", {}, h("a", { href: `#/jobs/${r.job_id}` }, r.job_id)), h("td", {}, r.stages), h("td", {}, badge(r.status)),
        cell(fmtBytes(r.size_bytes), r.size_bytes), cell(fmtX(r.compression_ratio), r.compression_ratio),
        cell(fmtMs(r.latency_ms_p50), r.latency_ms_p50), cell(r.speed_verdict === "no measurable change" ? "no measurable change" : fmtX(r.speedup), r.speedup),
        cell(r.sqnr_db === null ? "–" : `${r.sqnr_db.toFixed(1)} dB`, r.sqnr_db),
        cell(fmtPct(r.top1_agreement), r.top1_agreement), cell(fmtPct(r.accuracy), r.accuracy),
        cell(r.accuracy_drop === null ? "–" : `${(-r.accuracy_drop * 100).toFixed(2)} pt`, r.accuracy_drop),
        cell(fmtPct(r.sparsity), r.sparsity),
        h("td", { class: "warning" }, r.warnings && r.warnings.length ? `${r.warnings.length} ⚠` : ""))))),
    rows.some((r) => r.warnings && r.warnings.length) ? h("ul", { id: "compare-warnings", class: "warning" },
      rows.flatMap((r) => (r.warnings || []).map((w) => h("li", {}, h("code", {}, r.job_id), `: ${w}`)))) : "",
    h("h2", {}, "Size and latency against quality"),
    result.charts.length ? result.charts.map(chartFigure)
      : h("p", { class: "muted" }, "None of these jobs has measurements to plot.")));
}
