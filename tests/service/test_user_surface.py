"""The user's side: the Python client, live events, /metrics, the CLI and the dashboard.

One real server for the module: `python -m uvicorn app.main:app` in embedded mode (SQLite, file broker)
plus a real Celery worker process, as `make run` starts them. Only the client's retry arithmetic is
tested against a mock transport; everything else talks HTTP to the live server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from modelpress.client import Client, ClientError, Job
from tests.conftest import IN_CI
from tests.helpers import PROJECT_ROOT, WorkerProcess, mlp, sqnr_db, start_api_process, torchscript_bytes, wait_for

DYNAMIC_INT8 = {"stages": [{"method": "quantize", "scheme": "dynamic_int8"}], "example_input_shape": [1, 64]}


# ---------------------------------------------------------------- the client's retries (mock transport)


def test_client_retries_503_and_429_with_one_idempotency_key() -> None:
    sent: list[httpx.Request] = []
    answers = [
        httpx.Response(
            503, json={"error": "ServiceUnavailable", "detail": "broker down"}, headers={"Retry-After": "2"}
        ),
        httpx.Response(429, json={"error": "RateLimited", "detail": "slow down"}),
        "connect-error",
        httpx.Response(202, json={"id": "job_1", "status": "queued", "progress": 0.0, "spec": {}, "artifact": None}),
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        answer = answers[len(sent) - 1]
        if answer == "connect-error":
            raise httpx.ConnectError("refused", request=request)
        return answer

    slept: list[float] = []
    client = Client(
        "http://mp.test",
        "k",
        transport=httpx.MockTransport(handler),
        sleep=slept.append,
        backoff_s=0.5,
        max_backoff_s=8,
    )
    job = client.submit({"model_id": "mdl_1", **DYNAMIC_INT8})
    assert isinstance(job, Job) and job.id == "job_1" and job.status == "queued"
    assert len(sent) == 4 and all(r.method == "POST" and r.url.path == "/v1/jobs" for r in sent)
    keys = {r.headers["Idempotency-Key"] for r in sent}
    assert len(keys) == 1 and re.fullmatch(r"[0-9a-f-]{36}", keys.pop())  # one uuid4, reused by every retry
    assert {json.loads(r.content)["model_id"] for r in sent} == {"mdl_1"}
    assert slept[0] == 2.0  # Retry-After honoured
    assert 0.5 <= slept[1] <= 1.0 and 1.0 <= slept[2] <= 2.0  # exponential backoff (0.5 * 2**attempt), jittered
    # the next call gets a key of its own; a 4xx is not retried and says what was wrong
    answers[:] = [httpx.Response(422, json={"error": "InvalidRequest", "detail": "stages[0]: unknown scheme"})]
    sent.clear()
    with pytest.raises(ClientError) as raised:
        client.submit({"model_id": "mdl_1", "stages": []})
    assert (raised.value.status, raised.value.error) == (422, "InvalidRequest")
    assert "unknown scheme" in raised.value.detail and len(sent) == 1


# ---------------------------------------------------------------- a live server for the rest


@dataclass
class Live:
    url: str
    key: str
    env: dict[str, str]
    root: Path
    worker: WorkerProcess

    def client(self, **kwargs: object) -> Client:
        return Client(self.url, self.key, timeout=30, **kwargs)  # type: ignore[arg-type]

    def logs(self) -> str:
        server = (self.root / "server.log").read_text(errors="replace")[-2000:]
        return f"server log:\n{server}\nworker log:\n{self.worker.log_tail()}"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("live")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")}  # embedded mode
    env.update(MODELPRESS_DATA_DIR=str(root / "data"), MODELPRESS_RATE_LIMIT_PER_MINUTE="100000")
    created = subprocess.run(
        [sys.executable, "-m", "modelpress.cli", "keys", "create", "--tenant", "surface"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    server, base_url = start_api_process(env, root / "server.log")
    worker = WorkerProcess(env, log_path=root / "worker.log").start()
    live = Live(base_url, key, env, root, worker)
    try:

        def healthy() -> bool:
            assert server.poll() is None, live.logs()
            try:
                return httpx.get(f"{live.url}/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, 60, "the API server to start")
        yield live
    finally:
        worker.stop()
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = mlp((64, 128, 10)).eval()
    path = tmp_path_factory.mktemp("model") / "mlp.pt"
    path.write_bytes(torchscript_bytes(model))
    return path, model


@pytest.mark.slow
def test_live_submit_survives_a_lost_answer_and_the_event_stream_runs_to_the_end(live: Live, model_file) -> None:
    """A 503 that replaces the server's real 202 (the job exists, the answer was lost) is retried with the
    same Idempotency-Key: one job. Then the SSE stream: queued -> running -> succeeded, progress
    non-decreasing, ending with `end`."""
    path, _ = model_file
    real = httpx.HTTPTransport()
    keys: list[str] = []

    class LoseFirstAnswer(httpx.BaseTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            response = real.handle_request(request)
            if request.method == "POST" and request.url.path == "/v1/jobs":
                keys.append(request.headers["Idempotency-Key"])
                if len(keys) == 1:
                    response.read()
                    response.close()
                    return httpx.Response(
                        503,
                        json={"error": "ServiceUnavailable", "detail": "proxy hiccup"},
                        headers={"Retry-After": "0"},
                    )
            return response

    with live.client(transport=LoseFirstAnswer()) as client:
        model = client.upload_model(path, name="surface-mlp")
        job = client.submit({"model_id": model.id, **DYNAMIC_INT8})
        assert len(keys) == 2 and keys[0] == keys[1]
        assert [j.id for j in client.jobs(model_id=model.id)] == [job.id]

        events = list(client.events(job.id, timeout=240))
    kinds = [e.kind for e in events]
    assert kinds[-1] == "end" and events[-1].data["status"] == "succeeded", (kinds, live.logs())
    states = [e.data["status"] for e in events if e.kind == "state"]
    assert states == ["queued", "running", "succeeded"], states
    progress = [e.data["progress"] for e in events if e.kind == "progress"]
    assert progress and progress == sorted(progress) and progress[-1] == 1.0
    assert len(progress) >= 3  # live progress, not just a final figure


@pytest.mark.slow
def test_metrics_count_jobs_by_status_and_method(live: Live, model_file) -> None:
    path, _ = model_file
    with live.client() as client:
        model = client.upload_model(path)
        job = client.wait(client.submit({"model_id": model.id, **DYNAMIC_INT8}).id, timeout=240)
        assert job.status == "succeeded", job.error
        succeeded = sum(1 for _ in client.jobs(status="succeeded", method="quantize"))
    text = httpx.get(f"{live.url}/metrics", timeout=10).text
    line = re.search(
        r'^modelpress_jobs\{(?=[^}]*method="quantize")(?=[^}]*status="succeeded")[^}]*\} (\S+)$', text, re.M
    )
    assert line, text[:2000]
    assert float(line.group(1)) == succeeded >= 1
    assert "modelpress_api_request_seconds_bucket" in text and "modelpress_queue_depth" in text


def _modelpress(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("modelpress")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "modelpress.cli"]
    return subprocess.run(command + list(args), cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)


def _table_row(output: str, label: str) -> list[str]:
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if cells and cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no {label!r} row in:\n{output}")


@pytest.mark.slow
def test_cli_compress_on_the_server_and_local_agree(live: Live, model_file, tmp_path: Path) -> None:
    path, model = model_file
    spec = tmp_path / "spec.yaml"
    spec.write_text("stages:\n  - method: quantize\n    scheme: dynamic_int8\nexample_input_shape: [1, 64]\n")
    env = dict(live.env, MODELPRESS_URL=live.url, MODELPRESS_API_KEY=live.key, COLUMNS="120")

    served = _modelpress("compress", str(path), "--spec", str(spec), "--out", str(tmp_path / "served.pt"), env=env)
    assert served.returncode == 0, served.stderr[-3000:] + live.logs()
    job_id = re.search(r"submitted (job_\w+)", served.stderr).group(1)  # type: ignore[union-attr]
    with live.client() as client:
        job = client.get_job(job_id)
    metrics = job.metrics
    assert job.status == "succeeded" and metrics and job.artifact
    sizes = _table_row(served.stdout, "size (bytes)")
    assert sizes[:2] == [f"{metrics['original']['size_bytes']:,}", f"{metrics['compressed']['size_bytes']:,}"]
    assert _table_row(served.stdout, "size")[2] == f"{metrics['compression_ratio']:.2f}x smaller"
    assert _table_row(served.stdout, "parameters")[0] == f"{metrics['original']['parameters']:,}"
    assert _table_row(served.stdout, "fidelity: SQNR")[1] == f"{metrics['fidelity']['sqnr_db']:.1f} dB"
    assert (tmp_path / "served.pt").stat().st_size == job.artifact.size_bytes

    local = _modelpress(
        "compress",
        str(path),
        "--spec",
        str(spec),
        "--out",
        str(tmp_path / "local.pt"),
        "--local",
        env={k: v for k, v in env.items() if k not in ("MODELPRESS_URL", "MODELPRESS_API_KEY")},
    )
    assert local.returncode == 0, local.stderr[-3000:]
    local_sizes = _table_row(local.stdout, "size (bytes)")
    assert local_sizes[0] == sizes[0]
    assert abs(int(local_sizes[1].replace(",", "")) - metrics["compressed"]["size_bytes"]) <= 64  # same artifact
    assert _table_row(local.stdout, "parameters")[:2] == _table_row(served.stdout, "parameters")[:2]
    for artifact in ("served.pt", "local.pt"):
        loaded = torch.jit.load(str(tmp_path / artifact))
        x = torch.randn(16, 64)
        with torch.no_grad():
            assert sqnr_db(model(x), loaded(x)) >= 20
    assert f"artifact: {tmp_path / 'local.pt'}" in local.stdout.replace("\n", "")


def test_cli_local_rejects_a_bad_spec_before_loading_anything(tmp_path: Path, model_file) -> None:
    path, _ = model_file
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"stages": [{"method": "quantize", "scheme": "int3"}], "example_input_shape": [1, 64]}))
    result = _modelpress("compress", str(path), "--spec", str(spec), "--out", str(tmp_path / "x.pt"), "--local")
    assert result.returncode == 2 and "unknown scheme 'int3'" in result.stderr
    assert not (tmp_path / "x.pt").exists()


# ---------------------------------------------------------------- the dashboard in a real browser


def _browser(tmp_path: Path):  # type: ignore[no-untyped-def]
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as error:
        missing = f"selenium is not installed ({error})"
    else:
        missing = (
            ""
            if chromium and driver_path
            else "chromium / chromedriver not found (apt-get install chromium chromium-driver)"
        )
    if missing:
        if IN_CI:
            pytest.fail(missing)
        pytest.skip(missing)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,1400",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(driver_path))


@pytest.mark.slow
def test_dashboard_upload_submit_watch_and_read_the_numbers(live: Live, model_file, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    path, _ = model_file
    browser = _browser(tmp_path)
    screenshot = tmp_path / "dashboard.png"
    try:
        wait = WebDriverWait(browser, 240, poll_frequency=0.3)
        browser.get(f"{live.url}/ui/")
        browser.find_element(By.ID, "api-key").send_keys(live.key)
        browser.find_element(By.ID, "save-key").click()
        wait.until(lambda b: b.find_elements(By.ID, "jobs-table"))
        assert browser.execute_script("return localStorage.getItem('modelpress.apiKey')") == live.key

        browser.find_element(By.CSS_SELECTOR, "[data-nav=submit]").click()
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#scheme option"))
        browser.find_element(By.ID, "model-file").send_keys(str(path))
        Select(browser.find_element(By.ID, "method")).select_by_value("quantize")
        Select(browser.find_element(By.ID, "scheme")).select_by_value("dynamic_int8")
        browser.find_element(By.ID, "shape").send_keys("1, 64")
        browser.find_element(By.ID, "submit-job").click()

        wait.until(
            lambda b: (
                re.search(r"#/jobs/job_\w+$", b.current_url)
                or b.find_elements(By.CSS_SELECTOR, "#submit-status .error")
            )
        )
        errors = browser.find_elements(By.CSS_SELECTOR, "#submit-status .error")
        assert not errors, errors[0].text
        job_id = browser.current_url.rsplit("/", 1)[1]
        # the page follows the job over SSE and redraws with the metrics when it ends
        wait.until(
            lambda b: (
                b.find_elements(By.ID, "compression-ratio")
                or b.find_elements(By.CSS_SELECTOR, "#job-status [data-status=failed]")
            )
        )
        status = browser.find_element(By.CSS_SELECTOR, "#job-status .badge").text
        events = browser.find_element(By.ID, "events").get_attribute("textContent")
        shown_ratio = browser.find_element(By.ID, "compression-ratio").text
        shown_sqnr = browser.find_element(By.ID, "sqnr").text
        size_cells = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "[data-metric=size_bytes] td")]
        # the charts load after the metrics (rendered by the API); a quantize-only job has no sparsity chart
        no_layers = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "[data-chart=layer-sparsity-none]"))
        with live.client() as client:
            job = client.get_job(job_id)
        assert status == job.status == "succeeded", job.error
        assert job.metrics and shown_ratio == f"{job.metrics['compression_ratio']:.2f}×"
        assert shown_sqnr == f"{job.metrics['fidelity']['sqnr_db']:.1f} dB"
        assert size_cells[0] == f"{job.metrics['original']['size_bytes'] / 1024:.1f} KiB"
        assert "end: succeeded" in events  # the live stream ran to the terminal event on the page
        assert no_layers  # a quantize-only job has no per-layer table, and the page says so
        browser.save_screenshot(str(screenshot))

        # a pruning job on the same model: per-layer chart, then the model's size-vs-accuracy chart
        with live.client() as client:
            pruned = client.wait(
                client.submit(
                    {
                        "model_id": job.spec["model_id"],
                        "example_input_shape": [1, 64],
                        "stages": [
                            {"method": "prune", "scheme": "l1_unstructured", "amount": 0.5, "prune_classifier": True}
                        ],
                    }
                ).id,
                timeout=240,
            )
        assert pruned.status == "succeeded", pruned.error
        browser.get(f"{live.url}/ui/#/jobs/{pruned.id}")
        bars = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "[data-chart=layer-sparsity] g[id^=layer-bar-]"))
        layers = pruned.metrics["stages"][0]["info"]["layers"]  # type: ignore[index]
        assert len(bars) == len(layers) == 2
        browser.save_screenshot(str(tmp_path / "pruned.png"))
        browser.find_element(By.CSS_SELECTOR, f"a[href='#/models/{job.spec['model_id']}']").click()
        dots = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "[data-chart=size-accuracy] circle"))
        assert len(dots) == 3  # the original and both jobs
        browser.save_screenshot(str(tmp_path / "model.png"))
        browser.get(f"{live.url}/ui/#/jobs?status=succeeded&method=prune")
        rows = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#jobs-body tr[data-job]"))
        assert [r.get_attribute("data-job") for r in rows] == [pruned.id]
        browser.save_screenshot(str(tmp_path / "jobs.png"))
    except Exception:
        browser.save_screenshot(str(screenshot))
        raise
    finally:
        browser.quit()
    assert screenshot.stat().st_size > 10_000


@pytest.mark.slow
def test_cli_resource_commands_against_the_live_server(live: Live, model_file, tmp_path: Path) -> None:
    """models/datasets/jobs subcommands: JSON output matches the API; errors are one readable line."""
    import numpy as np

    with live.client() as client:
        if next(client.jobs(status="succeeded"), None) is None:  # run alone: make a finished job first
            model = client.upload_model(model_file[0])
            client.wait(client.submit({"model_id": model.id, **DYNAMIC_INT8}).id, timeout=240)
    env = dict(live.env, MODELPRESS_URL=live.url, MODELPRESS_API_KEY=live.key)
    data = tmp_path / "calibration.npz"
    np.savez(data, inputs=np.random.rand(8, 64).astype(np.float32), labels=np.arange(8) % 3)
    uploaded = _modelpress("datasets", "upload", str(data), "--json", env=env)
    assert uploaded.returncode == 0, uploaded.stderr
    dataset = json.loads(uploaded.stdout)
    assert dataset["id"].startswith("ds") and dataset["size_bytes"] == data.stat().st_size

    listed = _modelpress("jobs", "list", "--status", "succeeded", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    jobs = json.loads(listed.stdout)
    with live.client() as client:
        assert [j["id"] for j in jobs] == [j.id for j in client.jobs(status="succeeded")]
    done = jobs[0]["id"]
    shown = _modelpress("jobs", "show", done, env=dict(env, COLUMNS="120"))
    assert shown.returncode == 0 and done in shown.stdout and "compression" not in shown.stderr
    assert _table_row(shown.stdout, "size (bytes)")[1] == f"{jobs[0]['metrics']['compressed']['size_bytes']:,}"
    watched = _modelpress("jobs", "watch", done, env=env)  # a finished job's stream ends at once
    assert watched.returncode == 0 and "state: " in watched.stderr and f"{done}\tsucceeded" in watched.stdout
    cancelled = _modelpress("jobs", "cancel", done, env=env)
    assert cancelled.returncode == 1 and "409 Conflict" in cancelled.stderr
    models = _modelpress("models", "list", "--json", env=env)
    assert models.returncode == 0 and {m["id"] for m in json.loads(models.stdout)} >= {jobs[0]["spec"]["model_id"]}
    unauthorized = _modelpress("models", "list", env=dict(env, MODELPRESS_API_KEY="nope"))
    assert unauthorized.returncode == 1 and "401" in unauthorized.stderr
