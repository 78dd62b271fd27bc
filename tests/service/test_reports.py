"""Job reports, charts and the compare view, on real jobs run by a live server and a real worker.

Three jobs on one digits MLP (a search, a pruning job with fine-tuning, a quantization job) feed every
test in the module. The report is parsed with html.parser; its numbers are compared with the job's
metrics, and the delivered model's per-layer zeros with the downloaded artifact itself. Dashboard
screenshots land in var/test-screenshots/ (git-ignored) for review.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from app.report.content import speed_text
from modelpress.client import Client, ClientError
from tests.helpers import PROJECT_ROOT, digits_split, mlp, npz_bytes, torchscript_bytes, train
from tests.service.test_user_surface import Live, _browser, live  # noqa: F401  (module fixture)

pytestmark = pytest.mark.slow
SCREENSHOTS = PROJECT_ROOT / "var" / "test-screenshots"


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Page(HTMLParser):
    """Tags, attributes, text and the structure the tests look for in a report."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.mismatched: list[str] = []
        self.attributes: list[tuple[str, dict[str, str]]] = []
        self.charts: dict[str, dict[str, int]] = {}  # data-chart -> {svg id: <use> elements inside it}
        self.chart: str | None = None
        self.groups: list[str] = []
        self.text: list[str] = []
        self.cells: dict[str, list[str]] = {}  # data-metric -> data-values of its cells
        self.metric: str | None = None
        self.script_json = ""
        self.in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        self.attributes.append((tag, values))
        if tag not in VOID:
            self.stack.append(tag)
        if tag == "figure" and "data-chart" in values:
            self.chart = values["data-chart"]
            self.charts.setdefault(self.chart, {})
        if tag == "g" and self.chart:
            self.groups.append(values.get("id", ""))
            if values.get("id"):
                self.charts[self.chart].setdefault(values["id"], 0)
        if tag == "use" and self.chart:
            for group in filter(None, self.groups):
                self.charts[self.chart][group] += 1
        if tag == "tr" and "data-metric" in values:
            self.metric = values["data-metric"]
            self.cells[self.metric] = []
        if tag == "td" and self.metric is not None:
            self.cells[self.metric].append(values.get("data-value", ""))
        self.in_script = tag == "script" and values.get("id") == "metrics"

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if self.stack and self.stack[-1] == tag:
            self.stack.pop()
        else:
            self.mismatched.append(tag)
        if tag == "g" and self.groups:
            self.groups.pop()
        if tag == "figure":
            self.chart = None
        if tag == "tr":
            self.metric = None
        if tag == "script":
            self.in_script = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self.in_script:
            self.script_json += data


def parse(html: str) -> Page:
    page = Page()
    page.feed(html)
    page.close()
    return page


def external_urls(page: Page, html: str) -> list[str]:
    found = [
        v
        for _, attrs in page.attributes
        for k, v in attrs.items()
        if k in ("src", "href", "xlink:href", "action", "data") and re.match(r"\s*(https?:)?//", v)
    ]
    return found + re.findall(r"url\(\s*['\"]?\s*(?:https?:)?//[^)]*\)|@import", html)


def check_common(html: str, metrics: dict) -> Page:
    page = parse(html)
    assert html.lstrip().lower().startswith("<!doctype html>")
    assert not page.stack and not page.mismatched, (page.stack[:10], page.mismatched[:10])
    assert external_urls(page, html) == []
    assert json.loads(page.script_json) == metrics  # the measured document, as served by GET /v1/jobs/{id}
    original, compressed = metrics["original"], metrics["compressed"]

    def shown(value: object) -> str:  # a cell's data-value: the exact figure, absent when not measured
        return "" if value is None else json.dumps(value)

    for key in ("size_bytes", "parameters", "nonzero_parameters", "latency_ms_p50", "accuracy"):
        assert page.cells[key][:2] == [shown(original[key]), shown(compressed[key])], key
    assert page.cells["sqnr_db"][1] == shown(metrics["fidelity"]["sqnr_db"])
    text = " ".join(page.text)
    assert f"{metrics['compression_ratio']:.2f}×" in text
    assert f"{compressed['size_bytes']:,}" in text
    for warning in metrics["warnings"]:
        assert warning in text
    assert metrics["environment"]["versions"]["torch"] in text and "threads (latency)" in text
    return page


def _modelpress(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The CLI of this checkout (`-m` from the project root, whichever checkout the venv points at)."""
    return subprocess.run(
        [sys.executable, "-m", "modelpress.cli", *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


# ---------------------------------------------------------------- three real jobs


@pytest.fixture(scope="module")
def jobs(live: Live, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:  # noqa: F811
    folder = tmp_path_factory.mktemp("reports")
    x_train, x_test, y_train, y_test = digits_split()
    model = train(mlp((64, 128, 64, 10)), x_train, y_train, epochs=15)
    (folder / "mlp.pt").write_bytes(torchscript_bytes(model))
    (folder / "train.npz").write_bytes(npz_bytes(x_train, y_train))
    (folder / "test.npz").write_bytes(npz_bytes(x_test, y_test))
    with live.client() as client:
        uploaded = client.upload_model(folder / "mlp.pt", name="digits-mlp")
        data = {
            "dataset_id": client.upload_dataset(folder / "train.npz").id,
            "eval_dataset_id": client.upload_dataset(folder / "test.npz").id,
        }
        submitted = {
            "search": client.submit(
                {
                    "model_id": uploaded.id,
                    **data,
                    "search": {"max_accuracy_drop": 0.01, "max_trials": 6, "train": {"epochs": 2}},
                }
            ),
            "prune": client.submit(
                {
                    "model_id": uploaded.id,
                    **data,
                    "stages": [{"method": "prune", "scheme": "l1_unstructured", "amount": 0.7, "train": {"epochs": 3}}],
                }
            ),
            "quantize": client.submit(
                {
                    "model_id": uploaded.id,
                    **data,
                    "stages": [{"method": "quantize", "scheme": "dynamic_int8", "skip_layers": ["2"]}],
                }
            ),
        }
        done = {name: client.wait(job.id, timeout=600) for name, job in submitted.items()}
    for name, job in done.items():
        assert job.status == "succeeded", (name, job.error, live.logs())
    return {"model_id": uploaded.id, "folder": folder, **done}


def test_search_report_shows_every_measured_trial_the_front_the_bar_and_the_choice(live: Live, jobs) -> None:  # noqa: F811
    job = jobs["search"]
    with live.client() as client:
        html = client.report(job.id)
    page = check_common(html, job.metrics)
    info = job.metrics["stages"][0]["info"]
    measured = [t for t in info["trials"] if t["size_bytes"] is not None and t["accuracy"] is not None]
    assert len(measured) >= 3
    trials = page.charts["trials"]
    assert trials["trial-points"] == len(measured)
    assert {"pareto-front", "bar", "chosen-trial", "original-point"} <= set(trials)
    text = " ".join(page.text)
    assert f"bar: {(info['baseline_accuracy'] - 0.01) * 100:.2f} %" in text
    assert f"chosen: {info['chosen']['candidate']}" in text
    for trial in info["trials"]:
        assert trial["candidate"] in text
        if trial.get("speed_verdict"):  # each measured candidate's interleaved speed against the original
            assert speed_text(trial) in text
    # the search keeps no per-stage layer table; the delivered model's own zeros are charted when it has any
    layers = job.metrics["layers"]
    if any(row["sparsity"] > 0 for row in layers):
        assert page.charts["layer-sparsity"].keys() >= {f"layer-bar-{i}" for i in range(len(layers))}
    else:
        assert "layer-sparsity" not in page.charts
    assert "training" in page.charts  # the trials' fine-tuning epochs


def test_pruning_report_matches_the_downloaded_artifact_and_the_epoch_events(live: Live, jobs) -> None:  # noqa: F811
    job = jobs["prune"]
    with live.client() as client:
        html = client.report(job.id)
        artifact = client.download(job.id, jobs["folder"] / "pruned.pt")
        epochs = [e.data for e in client.events(job.id, timeout=30) if e.kind == "epoch"]
    page = check_common(html, job.metrics)
    table = job.metrics["stages"][0]["info"]["layers"]
    bars = [k for k in page.charts["layer-sparsity"] if k.startswith("layer-bar-")]
    assert len(bars) == len(table) == 3
    # independent: the zeros in the artifact the user downloads, layer by layer
    assert job.artifact is not None and job.artifact.format == "sparse_state_dict"
    state = torch.load(str(artifact), weights_only=True)  # as the README loads it
    weights = {
        name[: -len(".weight")]: t.to_dense() if t.layout != torch.strided else t
        for name, t in state.items()
        if name.endswith("weight")
    }
    text = " ".join(page.text)
    for row in table:
        measured = float((weights[row["layer"]] == 0).float().mean())
        assert abs(measured - row["sparsity"]) < 1e-6
        assert f"{measured * 100:.1f}%" in text
    assert [r["sparsity"] for r in job.metrics["layers"]] == [r["sparsity"] for r in table]
    assert len(epochs) == 3 and "training" in page.charts
    assert "Training: 3 epochs in 1 fit(s)" in text


def test_quantization_report_shows_bits_per_layer(live: Live, jobs) -> None:  # noqa: F811
    job = jobs["quantize"]
    with live.client() as client:
        html = client.report(job.id)
    page = check_common(html, job.metrics)
    info = job.metrics["stages"][0]["info"]
    assert info["skipped_layers"] == ["2"]
    bars = [k for k in page.charts["layer-bits"] if k.startswith("layer-bar-")]
    assert len(bars) == len(info["quantized_layers"]) + 1
    text = " ".join(page.text)
    assert text.count("8 bits (dynamic_int8)") == len(info["quantized_layers"])
    assert "float (skipped (skip_layers))" in text
    assert "trials" not in page.charts and "training" not in page.charts and "layer-sparsity" not in page.charts


def test_reports_charts_and_compare_are_tenant_scoped_and_compare_rows_are_the_metrics(live: Live, jobs) -> None:  # noqa: F811
    created = subprocess.run(
        [sys.executable, "-m", "modelpress.cli", "keys", "create", "--tenant", "outsider"],
        cwd=PROJECT_ROOT,
        env=live.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    outsider = Client(live.url, created.stdout.strip().splitlines()[-1], timeout=30)
    for path in (
        f"/v1/jobs/{jobs['prune'].id}/report",
        f"/v1/jobs/{jobs['prune'].id}/charts",
        f"/v1/models/{jobs['model_id']}/jobs/compare",
    ):
        with pytest.raises(ClientError) as refused:
            outsider._request("GET", path)
        assert refused.value.status == 404, path
    names = ("search", "prune", "quantize")
    with live.client() as client:
        result = client.compare(jobs["model_id"], [jobs[n].id for n in names], chart=True)
        with pytest.raises(ClientError) as unknown:
            client.compare(jobs["model_id"], [jobs["prune"].id, "job_nope"])
    assert unknown.value.status == 404
    assert [r["job_id"] for r in result["rows"]] == [jobs[n].id for n in names]
    for name, row in zip(names, result["rows"]):
        metrics = jobs[name].metrics
        assert row["size_bytes"] == metrics["compressed"]["size_bytes"]
        assert row["accuracy"] == metrics["compressed"]["accuracy"]
        assert row["sqnr_db"] == metrics["fidelity"]["sqnr_db"]
        assert row["latency_ms_p50"] == metrics["compressed"]["latency_ms_p50"]
    chart = parse(f'<figure data-chart="compare">{result["charts"][0]["svg"]}</figure>')
    assert chart.charts["compare"]["compare-points"] == 3


def test_cli_report_and_compress_write_the_report(live: Live, jobs, tmp_path: Path) -> None:  # noqa: F811
    env = dict(live.env, MODELPRESS_URL=live.url, MODELPRESS_API_KEY=live.key, COLUMNS="120")
    opened = tmp_path / "opened.txt"
    browser = f"{sys.executable} -c \"import sys; open('{opened}', 'w').write(sys.argv[1])\" %s"
    target = tmp_path / "search.html"
    result = _modelpress(
        "jobs", "report", jobs["search"].id, "-o", str(target), "--open", env=dict(env, BROWSER=browser)
    )
    assert result.returncode == 0, result.stderr
    with live.client() as client:
        assert target.read_text() == client.report(jobs["search"].id)
    assert opened.read_text() == target.resolve().as_uri()

    spec = tmp_path / "spec.yaml"
    spec.write_text("stages:\n  - method: quantize\n    scheme: dynamic_int8\nexample_input_shape: [1, 64]\n")
    compressed = _modelpress(
        "compress", str(jobs["folder"] / "mlp.pt"), "--spec", str(spec), "--out", str(tmp_path / "small.pt"), env=env
    )
    assert compressed.returncode == 0, compressed.stderr[-3000:]
    report = tmp_path / "small.report.html"
    assert f"report: {report}" in compressed.stdout.replace("\n", "")
    job_id = re.search(r"submitted (job_\w+)", compressed.stderr).group(1)  # type: ignore[union-attr]
    with live.client() as client:
        job = client.get_job(job_id)
    assert job.metrics is not None
    check_common(report.read_text(), job.metrics)


# ---------------------------------------------------------------- the dashboard in a real browser


def test_dashboard_search_trials_chart_and_compare_view(live: Live, jobs, tmp_path: Path) -> None:  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    search = jobs["search"]
    measured = [
        t
        for t in search.metrics["stages"][0]["info"]["trials"]
        if t["size_bytes"] is not None and t["accuracy"] is not None
    ]
    browser = _browser(tmp_path)
    try:
        wait = WebDriverWait(browser, 120, poll_frequency=0.3)
        browser.get(f"{live.url}/ui/")
        browser.find_element(By.ID, "api-key").send_keys(live.key)
        browser.find_element(By.ID, "save-key").click()
        wait.until(lambda b: b.find_elements(By.ID, "jobs-table"))

        browser.get(f"{live.url}/ui/#/jobs/{search.id}")
        points = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "[data-chart=trials] #trial-points use"))
        assert len(points) == len(measured) >= 3
        assert browser.find_elements(By.CSS_SELECTOR, "[data-chart=trials] #chosen-trial")
        assert browser.find_element(By.ID, "open-report").is_displayed()
        browser.save_screenshot(str(SCREENSHOTS / "search-job.png"))

        chosen = [jobs["prune"].id, jobs["quantize"].id, search.id]
        browser.get(f"{live.url}/ui/#/models/{jobs['model_id']}")
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "input.compare-pick"))
        for job_id in chosen:
            browser.find_element(By.CSS_SELECTOR, f"input.compare-pick[value='{job_id}']").click()
        browser.find_element(By.ID, "compare-selected").click()
        rows = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#compare-table tbody tr[data-job]"))
        shown = {r.get_attribute("data-job") for r in rows}
        assert shown == set(chosen)
        dots = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "[data-chart=compare] #compare-points use"))
        assert len(dots) == 3
        size_cells = {
            r.get_attribute("data-job"): r.find_elements(By.CSS_SELECTOR, "td.num")[0].get_attribute("data-value")
            for r in rows
        }
        for job_id in chosen:
            job = next(jobs[n] for n in ("search", "prune", "quantize") if jobs[n].id == job_id)
            assert size_cells[job_id] == str(job.metrics["compressed"]["size_bytes"])
        browser.save_screenshot(str(SCREENSHOTS / "compare.png"))
    except Exception:
        browser.save_screenshot(str(SCREENSHOTS / "failure.png"))
        raise
    finally:
        browser.quit()
    assert (SCREENSHOTS / "compare.png").stat().st_size > 10_000


def test_rendering_a_report_never_imports_torch() -> None:
    code = (
        "import sys, json; from app.report import report_html; "
        "m = {'original': {'size_bytes': 10}, 'compressed': {'size_bytes': 5}, 'compression_ratio': 2.0, "
        "'fidelity': {}, 'stages': [{'method': 'prune', 'scheme': 'l1_unstructured', 'info': {'layers': "
        "[{'layer': 'fc', 'sparsity': 0.5}]}}], 'warnings': []}; "
        "html = report_html({'id': 'job_x', 'status': 'succeeded', 'spec': {'stages': []}, 'metrics': m}, "
        "[('epoch', {'epoch': 1, 'loss': 1.0, 'lr': 0.1})]); "
        "print(html.count('<svg'), 'torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2", "False"]
