// ModelPress dashboard: plain JavaScript, no build step. Talks to the v1 API with the key from localStorage.
"use strict";

const KEY_STORE = "modelpress.apiKey";
const TERMINAL = ["succeeded", "failed", "cancelled"];
const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];
const state = { key: localStorage.getItem(KEY_STORE) || "", abort: null, timer: null, methods: null, pending: null,
                gen: 0 };

// ---------------------------------------------------------------- small helpers

function h(tag, attrs, ...children) {
  const el = document.createElementNS(
    ["svg", "rect", "line", "text", "circle", "g", "title", "polyline"].includes(tag) ? "http://www.w3.org/2000/svg"
      : "http://www.w3.org/1999/xhtml", tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

const view = () => document.getElementById("view");
// Views render only if no newer navigation started while they were loading.
function show(gen, ...nodes) {
  if (gen !== state.gen) return false;
  view().replaceChildren(...nodes);
  return true;
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
}
const fmtInt = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));
const fmtPct = (x) => (x === null || x === undefined ? "–" : `${(x * 100).toFixed(1)}%`);
const fmtMs = (x) => (x === null || x === undefined ? "–" : `${x.toFixed(3)} ms`);
const fmtX = (x) => (x === null || x === undefined ? "–" : `${x.toFixed(2)}×`);
// The speed change as the job measured it: a ratio only when it is outside the noise (speed_verdict), with its
// interval; "no measurable change" otherwise. Jobs measured before verdicts existed show their bare ratio.
const fmtSpeed = (m) => {
  if (!m || m.speedup === null || m.speedup === undefined) return "–";
  if (m.speed_verdict === "no measurable change") return "no measurable change";
  const spread = m.speedup_low !== undefined && m.speedup_low !== null
    ? ` (${m.speedup_low.toFixed(2)}–${m.speedup_high.toFixed(2)})` : "";
  return m.speedup >= 1 ? `${fmtX(m.speedup)} faster${spread}` : `${fmtX(1 / m.speedup)} slower${spread}`;
};
const fmtDate = (s) => (s ? new Date(s).toLocaleString() : "–");
const stagesOf = (job) => (job.spec.stages || []).map((s) => `${s.method}:${s.scheme}`).join(" → ");

function newKey() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  return "ui-" + Date.now().toString(36) + "-" + Math.random().toString(36).slice(2);
}

class ApiError extends Error {
  constructor(status, body) {
    super(`${status} ${body.error || "Error"}: ${body.detail || ""}`);
    this.status = status;
    this.body = body;
  }
}

function authHeaders(extra) {
  return Object.assign({ Authorization: `Bearer ${state.key}` }, extra || {});
}

async function api(path, options = {}) {
  const response = await fetch(path, Object.assign({}, options, { headers: authHeaders(options.headers) }));
  if (!response.ok) {
    let body = {};
    try { body = await response.json(); } catch (_) { body = { detail: response.statusText }; }
    throw new ApiError(response.status, body);
  }
  return response.status === 204 ? null : response.json();
}

async function methods() {
  if (!state.methods) state.methods = await api("/v1/methods");
  return state.methods;
}

function errorBox(error) {
  return h("p", { class: "error", role: "alert" }, error instanceof Error ? error.message : String(error));
}

function badge(status) {
  return h("span", { class: `badge ${status}`, "data-status": status }, status);
}

function progressBar(fraction, id) {
  const pct = Math.round((fraction || 0) * 100);
  return h("div", { class: "progress", id, role: "progressbar", "aria-valuenow": pct, "aria-valuemin": 0,
                    "aria-valuemax": 100 },
    h("div", { class: "fill", style: `width:${pct}%` }), h("span", { class: "pct" }, `${pct}%`));
}

function setProgress(el, fraction) {
  if (!el) return;
  const pct = Math.round((fraction || 0) * 100);
  el.setAttribute("aria-valuenow", pct);
  el.querySelector(".fill").style.width = `${pct}%`;
  el.querySelector(".pct").textContent = `${pct}%`;
}

// ---------------------------------------------------------------- Server-Sent Events over fetch
// EventSource cannot send an Authorization header, so read the stream with fetch and parse it here.

async function followEvents(jobId, onEvent, signal) {
  let lastId = null;
  for (let attempt = 0; attempt < 20 && !signal.aborted; attempt++) {
    try {
      const headers = authHeaders({ Accept: "text/event-stream" });
      if (lastId) headers["Last-Event-ID"] = lastId;
      const response = await fetch(`/v1/jobs/${encodeURIComponent(jobId)}/events`, { headers, signal });
      if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => ({})));
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n?/g, "\n");
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const event = { kind: "message", data: "", id: null };
          for (const line of block.split("\n")) {
            if (!line || line.startsWith(":")) continue;
            const colon = line.indexOf(":");
            const field = colon < 0 ? line : line.slice(0, colon);
            const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
            if (field === "event") event.kind = text;
            else if (field === "data") event.data += (event.data ? "\n" : "") + text;
            else if (field === "id") event.id = text;
          }
          if (event.id) lastId = event.id;
          let data = {};
          try { data = event.data ? JSON.parse(event.data) : {}; } catch (_) { data = { text: event.data }; }
          onEvent(event.kind, data);
          if (event.kind === "end") return;
        }
      }
    } catch (error) {
      if (signal.aborted) return;
      if (error instanceof ApiError && error.status < 500 && error.status !== 429) throw error;
    }
    await new Promise((resolve) => setTimeout(resolve, Math.min(10000, 500 * 2 ** attempt)));
  }
}

// ---------------------------------------------------------------- charts (plain SVG)

function sizeAccuracyChart(jobs) {
  const done = jobs.filter((j) => j.status === "succeeded" && j.metrics);
  if (!done.length) return h("p", { class: "muted" }, "No finished jobs for this model yet.");
  const useAccuracy = done.some((j) => j.metrics.compressed.accuracy !== null && j.metrics.compressed.accuracy !== undefined);
  const yOf = (m, side) => (useAccuracy ? m[side].accuracy
    : side === "original" ? 1 : (m.fidelity || {}).top1_agreement);
  const points = [];
  const first = done[0].metrics;
  if (yOf(first, "original") !== null && yOf(first, "original") !== undefined) {
    points.push({ x: first.original.size_bytes, y: yOf(first, "original"), label: "original", original: true });
  }
  for (const job of done) {
    const y = yOf(job.metrics, "compressed");
    if (y === null || y === undefined) continue;
    points.push({ x: job.metrics.compressed.size_bytes, y, label: `${job.id} (${stagesOf(job)})`, job });
  }
  if (!points.length) return h("p", { class: "muted" }, "These jobs report neither accuracy nor top-1 agreement.");
  const W = 560, H = 300, L = 64, R = 34, T = 14, B = 44;
  const xs = points.map((p) => p.x), ys = points.map((p) => p.y);
  const x0 = 0, x1 = Math.max(...xs) * 1.08;
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  const pad = Math.max(0.01, (y1 - y0) * 0.15);
  y0 = Math.max(0, y0 - pad); y1 = Math.min(1, y1 + pad);
  if (y1 <= y0) y1 = y0 + 0.01;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const svg = h("svg", { class: "chart scatter", viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img",
                         "aria-label": "size versus accuracy" },
    h("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }),
    h("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }));
  for (let i = 0; i <= 4; i++) {
    const xv = x0 + ((x1 - x0) * i) / 4, yv = y0 + ((y1 - y0) * i) / 4;
    svg.append(h("text", { x: sx(xv), y: H - B + 16, "text-anchor": "middle", class: "tick" }, fmtBytes(Math.round(xv))),
               h("text", { x: L - 6, y: sy(yv) + 4, "text-anchor": "end", class: "tick" }, fmtPct(yv)),
               h("line", { x1: L, y1: sy(yv), x2: W - R, y2: sy(yv), class: "grid" }));
  }
  svg.append(h("text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle", class: "axis-label" }, "artifact size"),
             h("text", { x: 14, y: (T + H - B) / 2, "text-anchor": "middle", class: "axis-label",
                         transform: `rotate(-90 14 ${(T + H - B) / 2})` },
               useAccuracy ? "accuracy" : "top-1 agreement with the original"));
  for (const p of points) {
    const dot = h("circle", { cx: sx(p.x), cy: sy(p.y), r: p.original ? 6 : 5, class: p.original ? "dot original" : "dot",
                              onclick: p.job ? () => { location.hash = `#/jobs/${p.job.id}`; } : null },
      h("title", {}, `${p.label}: ${fmtBytes(p.x)}, ${fmtPct(p.y)}`));
    svg.append(dot);
  }
  return h("figure", { class: "chart-box", "data-chart": "size-accuracy" },
    h("figcaption", {}, useAccuracy ? "Size versus accuracy (eval dataset)"
      : "Size versus top-1 agreement with the original (no eval labels)"), svg);
}

// ---------------------------------------------------------------- views

function needKey() {
  const gen = state.gen;
  show(gen, h("section", { class: "card" }, h("h1", {}, "Enter an API key"),
    h("p", {}, "Paste a key in the box above. Create one on the server with ",
      h("code", {}, "modelpress keys create --tenant NAME"), ".")));
}

async function jobsView(query) {
  const gen = state.gen;
  const params = new URLSearchParams(query);
  const catalogue = await methods();
  const filter = (name, options) => h("label", {}, `${name} `,
    h("select", { id: `filter-${name}`, onchange: () => {
      const next = new URLSearchParams();
      for (const n of ["status", "method"]) {
        const v = document.getElementById(`filter-${n}`).value;
        if (v) next.set(n, v);
      }
      location.hash = `#/jobs${next.toString() ? "?" + next : ""}`;
    } }, h("option", { value: "" }, "any"),
      options.map((o) => h("option", { value: o, selected: params.get(name) === o }, o))));
  const body = h("tbody", { id: "jobs-body" });
  const more = h("button", { id: "more-jobs", class: "quiet", hidden: true }, "Load more");
  if (!show(gen, h("section", {},
    h("div", { class: "row" }, h("h1", {}, "Jobs"),
      h("div", { class: "filters" }, filter("status", STATUSES), filter("method", catalogue.methods.map((m) => m.method)))),
    h("table", { class: "list", id: "jobs-table" },
      h("thead", {}, h("tr", {}, ["job", "model", "stages", "status", "progress", "ratio", "SQNR", "created"]
        .map((c) => h("th", {}, c)))), body), more))) return;
  let cursor = null;
  const load = async () => {
    const q = new URLSearchParams({ limit: "25" });
    for (const n of ["status", "method"]) if (params.get(n)) q.set(n, params.get(n));
    if (cursor) q.set("cursor", cursor);
    const page = await api(`/v1/jobs?${q}`);
    for (const job of page.items) {
      const m = job.metrics || {};
      body.append(h("tr", { "data-job": job.id },
        h("td", {}, h("a", { href: `#/jobs/${job.id}` }, job.id)),
        h("td", {}, h("a", { href: `#/models/${job.spec.model_id}` }, job.spec.model_id)),
        h("td", {}, stagesOf(job)), h("td", {}, badge(job.status)),
        h("td", {}, progressBar(job.progress)), h("td", { class: "num" }, fmtX(m.compression_ratio),
          (m.warnings || []).length ? h("span", { class: "warning", title: m.warnings.join("\n") }, " ⚠") : null),
        h("td", { class: "num" }, m.fidelity && m.fidelity.sqnr_db !== null && m.fidelity.sqnr_db !== undefined
          ? `${m.fidelity.sqnr_db.toFixed(1)} dB` : "–"),
        h("td", {}, fmtDate(job.created_at))));
    }
    if (!body.children.length) body.append(h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No jobs match.")));
    cursor = page.next_cursor;
    more.hidden = !cursor;
    return page.items;
  };
  more.addEventListener("click", () => load().catch((e) => view().append(errorBox(e))));
  const first = await load();
  if (gen === state.gen && first.some((j) => !TERMINAL.includes(j.status))) {
    state.timer = setTimeout(() => route(), 3000);  // refresh while something is running
  }
}

function metricsSection(job) {
  const m = job.metrics;
  if (!m) {
    return h("p", { class: "muted", id: "metrics-pending" },
      job.status === "failed" || job.status === "cancelled" ? "No metrics: the job did not finish."
        : "Metrics appear when the job succeeds.");
  }
  const o = m.original || {}, c = m.compressed || {}, f = m.fidelity || {};
  const row = (label, key, fmt, a, b, change) => h("tr", { "data-metric": key },
    h("th", {}, label), h("td", { class: "num" }, fmt(a)), h("td", { class: "num" }, fmt(b)),
    h("td", { class: "num" }, change || ""));
  const acc = o.accuracy !== null && o.accuracy !== undefined && c.accuracy !== null && c.accuracy !== undefined
    ? `${((c.accuracy - o.accuracy) * 100).toFixed(2)} pt` : "";
  const warnings = m.warnings || [];
  return h("section", { id: "metrics" },
    // warnings first: a result that reads well but gains nothing or broke the model must not hide below the fold
    warnings.length ? h("div", { class: "warnings", id: "metrics-warnings", role: "alert" },
      h("strong", {}, warnings.length === 1 ? "Warning" : `${warnings.length} warnings`),
      h("ul", {}, warnings.map((w) => h("li", { class: "warning" }, w)))) : null,
    h("dl", { class: "headline" },
      h("div", {}, h("dt", {}, "compression"),
        h("dd", { id: "compression-ratio", "data-value": m.compression_ratio }, fmtX(m.compression_ratio))),
      h("div", {}, h("dt", {}, "speed"), h("dd", { id: "speedup", "data-value": m.speedup,
        "data-verdict": m.speed_verdict || "" }, fmtSpeed(m))),
      h("div", {}, h("dt", {}, "SQNR"),
        h("dd", { id: "sqnr", "data-value": f.sqnr_db }, f.sqnr_db === null || f.sqnr_db === undefined ? "–"
          : `${f.sqnr_db.toFixed(1)} dB`)),
      h("div", {}, h("dt", {}, "top-1 agreement"),
        h("dd", { id: "top1", "data-value": f.top1_agreement }, fmtPct(f.top1_agreement)))),
    h("table", { class: "metrics", id: "metrics-table" },
      h("thead", {}, h("tr", {}, h("th", {}, ""), h("th", {}, "original"), h("th", {}, "compressed"), h("th", {}, "change"))),
      h("tbody", {},
        row("size", "size_bytes", fmtBytes, o.size_bytes, c.size_bytes, fmtX(m.compression_ratio) + " smaller"),
        row("parameters", "parameters", fmtInt, o.parameters, c.parameters),
        row("nonzero parameters", "nonzero_parameters", fmtInt, o.nonzero_parameters, c.nonzero_parameters),
        row("sparsity", "sparsity", fmtPct, o.sparsity, c.sparsity),
        row(`latency p50 (batch ${m.batch_size}, ${m.device})`, "latency_ms_p50", fmtMs, o.latency_ms_p50,
            c.latency_ms_p50, !m.speedup ? "" : fmtSpeed(m)),
        row("latency p95", "latency_ms_p95", fmtMs, o.latency_ms_p95, c.latency_ms_p95),
        row("accuracy", "accuracy", fmtPct, o.accuracy, c.accuracy, acc))));
}

async function downloadArtifact(job) {
  const response = await fetch(`/v1/jobs/${job.id}/artifact`, { headers: authHeaders() });
  if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => ({})));
  const url = URL.createObjectURL(await response.blob());
  // the file name the API gives (its extension from modelpress/artifact_formats.py, the one format table)
  const named = /filename="([^"]+)"/.exec(response.headers.get("Content-Disposition") || "");
  const link = h("a", { href: url, download: named ? named[1] : `${job.id}.bin` });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

async function jobView(jobId) {
  const gen = state.gen;
  const job = await api(`/v1/jobs/${encodeURIComponent(jobId)}`);
  const log = h("ol", { class: "events", id: "events" });
  const parts = { status: h("span", { id: "job-status" }), times: h("span", {}), error: h("div", {}),
                  actions: h("div", { class: "actions" }), metrics: h("div", {}), layers: h("div", {}) };
  const fill = (current) => {
    parts.status.replaceChildren(badge(current.status));
    parts.times.textContent = ` · created ${fmtDate(current.created_at)}` +
      (current.finished_at ? ` · finished ${fmtDate(current.finished_at)}` : "");
    setProgress(document.getElementById("job-progress"), current.progress);
    document.getElementById("job-stage").textContent = current.stage || "";
    parts.error.replaceChildren(current.error
      ? h("p", { class: "error", id: "job-error" }, `${current.error.error}: ${current.error.detail}`) : "");
    parts.actions.replaceChildren();
    if (!TERMINAL.includes(current.status)) {
      parts.actions.append(h("button", { id: "cancel-job", class: "quiet", onclick: async (e) => {
        e.target.disabled = true;
        try { await api(`/v1/jobs/${current.id}/cancel`, { method: "POST" }); } catch (err) { view().append(errorBox(err)); }
      } }, "Cancel"));
    }
    if (current.artifact) {
      parts.actions.append(h("button", { id: "download",
                                         onclick: () => downloadArtifact(current).catch((e) => view().append(errorBox(e))) },
        `Download (${fmtBytes(current.artifact.size_bytes)}, ${current.artifact.format})`));
    }
    parts.metrics.replaceChildren(metricsSection(current));
    if (TERMINAL.includes(current.status)) {
      parts.actions.append(...reportButtons(current));
      jobChartsSection(current).then((node) => parts.layers.replaceChildren(node))
        .catch((error) => parts.layers.replaceChildren(errorBox(error)));
    } else {
      parts.layers.replaceChildren(h("p", { class: "muted" }, "Charts appear when the job ends."));
    }
  };
  if (!show(gen, h("section", { id: "job", "data-job": job.id },
    h("div", { class: "row" }, h("h1", {}, "Job ", h("code", {}, job.id)), parts.status),
    h("p", {}, stagesOf(job), " on model ", h("a", { href: `#/models/${job.spec.model_id}` }, job.spec.model_id),
      parts.times),
    h("div", { class: "live" }, progressBar(job.progress, "job-progress"), h("span", { id: "job-stage", class: "muted" })),
    parts.error, parts.actions,
    h("h2", {}, "Before / after"), parts.metrics,
    h("h2", {}, "Charts"), parts.layers,
    h("details", { open: !TERMINAL.includes(job.status) }, h("summary", {}, "Live events"), log),
    h("details", {}, h("summary", {}, "Spec"), h("pre", {}, JSON.stringify(job.spec, null, 2)))))) return;
  fill(job);
  if (TERMINAL.includes(job.status)) return;
  const controller = new AbortController();
  state.abort = controller;
  const note = (text) => {
    log.append(h("li", {}, text));
    while (log.children.length > 200) log.firstChild.remove();
  };
  followEvents(job.id, (kind, data) => {
    if (kind === "progress") {
      setProgress(document.getElementById("job-progress"), data.progress);
      document.getElementById("job-stage").textContent = data.stage || "";
    } else if (kind === "state") {
      parts.status.replaceChildren(badge(data.status));
      note(`state: ${data.status}`);
    } else if (kind === "end") {
      note(`end: ${data.status}`);
      // redraw in place with the final record (metrics, artifact), keeping the event log
      api(`/v1/jobs/${encodeURIComponent(job.id)}`).then((final) => {
        if (state.abort === controller) fill(final);
      }).catch((error) => view().append(errorBox(error)));
    } else {
      note(`${kind}: ${JSON.stringify(data)}`);
    }
  }, controller.signal).catch((error) => view().append(errorBox(error)));
}

async function modelsView() {
  const gen = state.gen;
  const page = await api("/v1/models?limit=100");
  show(gen, h("section", {}, h("h1", {}, "Models"),
    h("table", { class: "list" },
      h("thead", {}, h("tr", {}, ["model", "name", "format", "size", "parameters", "status", "uploaded"].map((c) => h("th", {}, c)))),
      h("tbody", {}, page.items.length ? page.items.map((m) => h("tr", {},
        h("td", {}, h("a", { href: `#/models/${m.id}` }, m.id)), h("td", {}, m.name), h("td", {}, m.format),
        h("td", { class: "num" }, fmtBytes(m.size_bytes)),
        h("td", { class: "num" }, fmtInt((m.inspection || {}).parameters)), h("td", {}, badge(m.status)),
        h("td", {}, fmtDate(m.created_at))))
        : h("tr", {}, h("td", { colspan: 7, class: "muted" }, "No models yet: upload one from Submit."))))));
}

async function modelView(modelId) {
  const gen = state.gen;
  const model = await api(`/v1/models/${encodeURIComponent(modelId)}`);
  const jobs = [];
  let cursor = null;
  do {
    const q = new URLSearchParams({ model_id: modelId, limit: "200" });
    if (cursor) q.set("cursor", cursor);
    const page = await api(`/v1/jobs?${q}`);
    jobs.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor && jobs.length < 1000);
  const inspection = model.inspection || {};
  const compare = compareControls(model.id, jobs);
  show(gen, h("section", { id: "model", "data-model": model.id },
    h("div", { class: "row" }, h("h1", {}, model.name, " ", h("code", {}, model.id)), badge(model.status)),
    h("p", {}, `${model.format} · ${fmtBytes(model.size_bytes)} · ${fmtInt(inspection.parameters)} parameters`,
      inspection.error ? ` · rejected: ${inspection.error}` : ""),
    h("h2", {}, "Size versus accuracy across its jobs"), sizeAccuracyChart(jobs),
    h("div", { class: "row" }, h("h2", {}, "Jobs"), compare.available ? compare.button : ""),
    h("table", { class: "list", id: "model-jobs" },
      h("thead", {}, h("tr", {}, ["", "job", "stages", "status", "size", "ratio", "accuracy", "top-1 agr."].map((c) => h("th", {}, c)))),
      h("tbody", {}, jobs.map((j) => {
        const m = j.metrics || { compressed: {}, fidelity: {} };
        return h("tr", { "data-job": j.id }, h("td", {}, compare.pick(j)),
          h("td", {}, h("a", { href: `#/jobs/${j.id}` }, j.id)), h("td", {}, stagesOf(j)),
          h("td", {}, badge(j.status)), h("td", { class: "num" }, fmtBytes(m.compressed.size_bytes)),
          h("td", { class: "num" }, fmtX(m.compression_ratio)), h("td", { class: "num" }, fmtPct(m.compressed.accuracy)),
          h("td", { class: "num" }, fmtPct((m.fidelity || {}).top1_agreement)));
      })))));
}

async function submitView() {
  const gen = state.gen;
  const catalogue = await methods();
  const models = (await api("/v1/models?limit=100")).items;
  const schemeSelect = h("select", { id: "scheme", name: "scheme" });
  const help = h("div", { id: "scheme-help", class: "muted" });
  const deviceSelect = h("select", { id: "device", name: "device" });
  const fillSchemes = () => {
    const method = catalogue.methods.find((m) => m.method === document.getElementById("method").value);
    schemeSelect.replaceChildren(...method.schemes.map((s) => h("option", { value: s.name }, s.name)));
    describe();
  };
  const describe = () => {
    const method = catalogue.methods.find((m) => m.method === document.getElementById("method").value);
    const scheme = method.schemes.find((s) => s.name === schemeSelect.value);
    if (!scheme) return;
    deviceSelect.replaceChildren(...scheme.devices.map((d) => h("option", { value: d }, d)));
    help.replaceChildren(h("p", {}, scheme.summary, scheme.needs_dataset ? " Needs a dataset." : "",
      scheme.runnable_now === false ? " No live worker runs it right now." : ""),
      scheme.options.length ? h("ul", {}, scheme.options.map((o) => h("li", {}, h("code", {}, o.name),
        ` (${o.kind}, default ${JSON.stringify(o.default)}` +
        (o.minimum !== null ? `, ≥ ${o.minimum}` : "") + (o.maximum !== null ? `, ${o.maximum_exclusive ? "<" : "≤"} ${o.maximum}` : "") +
        (o.choices ? `, one of ${o.choices.join(", ")}` : "") + `)${o.help ? ": " + o.help : ""}`))) : "");
  };
  schemeSelect.addEventListener("change", describe);
  const status = h("p", { id: "submit-status", class: "muted" });
  const form = h("form", { id: "submit-form", class: "card" },
    h("h1", {}, "Submit a job"),
    h("label", {}, "Model file ", h("input", { type: "file", id: "model-file", name: "file" })),
    h("label", {}, "or an uploaded model ", h("select", { id: "model-select" }, h("option", { value: "" }, "— upload the file above —"),
      models.map((m) => h("option", { value: m.id }, `${m.name} (${m.id}, ${m.format})`)))),
    h("div", { class: "grid" },
      h("label", {}, "Method ", h("select", { id: "method", name: "method", onchange: fillSchemes },
        catalogue.methods.map((m) => h("option", { value: m.method, selected: m.method === "quantize" }, m.method)))),
      h("label", {}, "Scheme ", schemeSelect),
      h("label", {}, "Device ", deviceSelect),
      h("label", {}, "Example input shape ", h("input", { id: "shape", placeholder: "1, 64" })),
      h("label", {}, "Output format ", h("select", { id: "output-format" }, h("option", { value: "" }, "automatic"),
        catalogue.output_formats.map((f) => h("option", { value: f }, f))))),
    help,
    h("label", {}, "Options (JSON) ", h("textarea", { id: "options", rows: 4, spellcheck: "false" }, "{}")),
    h("button", { type: "submit", id: "submit-job" }, "Upload and submit"), status);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = document.getElementById("submit-job");
    button.disabled = true;
    try {
      let options;
      try { options = JSON.parse(document.getElementById("options").value || "{}"); } catch (e) {
        throw new Error(`options are not valid JSON: ${e.message}`);
      }
      let modelId = document.getElementById("model-select").value;
      const file = document.getElementById("model-file").files[0];
      if (!modelId) {
        if (!file) throw new Error("choose a model file or an uploaded model");
        status.textContent = `uploading ${file.name}…`;
        const data = new FormData();
        data.append("file", file);
        data.append("name", file.name);
        modelId = (await api("/v1/models", { method: "POST", body: data })).id;
      }
      const spec = { model_id: modelId,
                     stages: [Object.assign({ method: document.getElementById("method").value, scheme: schemeSelect.value }, options)],
                     target: { device: deviceSelect.value } };
      const shape = document.getElementById("shape").value.trim();
      if (shape) spec.example_input_shape = shape.replace(/[[\]()]/g, "").split(/[\s,x]+/).filter(Boolean).map(Number);
      const fmt = document.getElementById("output-format").value;
      if (fmt) spec.output_format = fmt;
      // one Idempotency-Key per distinct submission: a resubmit of the same body after an error never makes two jobs
      const body = JSON.stringify(spec);
      if (!state.pending || state.pending.body !== body) state.pending = { body, key: newKey() };
      status.textContent = "submitting…";
      const job = await api("/v1/jobs", { method: "POST", body,
                                          headers: { "Content-Type": "application/json", "Idempotency-Key": state.pending.key } });
      state.pending = null;
      location.hash = `#/jobs/${job.id}`;
    } catch (error) {
      status.replaceChildren(errorBox(error));
    } finally {
      button.disabled = false;
    }
  });
  if (!show(gen, form)) return;
  fillSchemes();
}

// ---------------------------------------------------------------- routing and the key

async function route() {
  if (state.abort) { state.abort.abort(); state.abort = null; }
  if (state.timer) { clearTimeout(state.timer); state.timer = null; }
  const gen = ++state.gen;
  const [path, query] = (location.hash.replace(/^#/, "") || "/jobs").split("?");
  const parts = path.split("/").filter(Boolean);
  document.querySelectorAll("[data-nav]").forEach((a) => a.classList.toggle("active", a.dataset.nav === parts[0]));
  if (!state.key) return needKey();
  try {
    if (parts[0] === "jobs" && parts[1]) await jobView(decodeURIComponent(parts[1]));
    else if (parts[0] === "models" && parts[1] && parts[2] === "compare") {
      await compareView(decodeURIComponent(parts[1]), query || "");
    } else if (parts[0] === "models" && parts[1]) await modelView(decodeURIComponent(parts[1]));
    else if (parts[0] === "models") await modelsView();
    else if (parts[0] === "submit") await submitView();
    else await jobsView(query || "");
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      show(gen, h("section", { class: "card" }, h("h1", {}, "That key was not accepted"), errorBox(error)));
    } else {
      show(gen, errorBox(error));
    }
  }
}

function showKeyState() {
  document.getElementById("api-key").value = state.key;
  document.getElementById("key-state").textContent = state.key ? "saved" : "no key";
}

document.getElementById("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.key = document.getElementById("api-key").value.trim();
  state.methods = null;
  if (state.key) localStorage.setItem(KEY_STORE, state.key); else localStorage.removeItem(KEY_STORE);
  showKeyState();
  route();
});
document.getElementById("clear-key").addEventListener("click", () => {
  state.key = "";
  localStorage.removeItem(KEY_STORE);
  showKeyState();
  route();
});
window.addEventListener("hashchange", route);
showKeyState();
route();
