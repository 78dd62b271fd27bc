"""Section 5: the read path against a bare FastAPI endpoint on the same Postgres, loaded with wrk.

Authenticated GET /v1/jobs/{id} and GET /v1/jobs (the API as deployed: uvicorn, API key, rate limiter in
Redis, a real Celery worker next to it) and a bare FastAPI endpoint reading one row of the same database
(bench/bare_app.py, same uvicorn), measured side by side in one run: closed-loop rounds interleaved across the
three endpoints, then each paced at a fixed rate. The load comes from wrk, a compiled generator on one thread,
so it takes little of the two cores it measures.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.common import PYTHON, ROOT, Assets, Size, command_for, fmt, log
from bench.harness import MODE_LABELS, ServicePool, _die_with_parent, free_port

MODEL = "lenet-300-100"
THROUGHPUT_SHARE_TARGET = 0.5
P99_TARGET_MS = 20.0
PACED_RATE = 300
WRK_THREADS = 1
CLOSED_CONNECTIONS = 8
PACED_CONNECTIONS = 10
LIST_LIMIT = 20
PACING_SCRIPT = 'local ms = tonumber(os.getenv("WRK_DELAY_MS"))\nfunction delay() return ms end\n'

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip()).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def parse_wrk(output: str) -> dict[str, Any]:
    """Requests/s, latency percentiles (ms), request count and errors from `wrk --latency` output."""
    percentiles = {f"p{q}_ms": _ms(value) for q, value in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", output, re.M)}
    requests = re.search(r"(\d+) requests in", output)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if not rate or not requests or "p99_ms" not in percentiles:
        raise RuntimeError(f"could not read wrk's output:\n{output[-1500:]}")
    errors = (int(non_2xx.group(1)) if non_2xx else 0) + (sum(int(g) for g in socket.groups()) if socket else 0)
    return {
        "requests": int(requests.group(1)),
        "throughput_rps": round(float(rate.group(1)), 1),
        "errors": errors,
        **{k: round(v, 3) for k, v in percentiles.items()},
    }


def wrk(
    url: str,
    seconds: float,
    connections: int,
    headers: dict[str, str],
    *,
    delay_ms: float | None = None,
    script: Path | None = None,
) -> dict[str, Any]:
    command = [
        "wrk",
        "-t",
        str(WRK_THREADS),
        "-c",
        str(connections),
        "-d",
        f"{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        "5s",
    ]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    env = dict(os.environ)
    if delay_ms is not None:
        assert script is not None
        command += ["-s", str(script)]
        env["WRK_DELAY_MS"] = f"{max(0.0, delay_ms):.3f}"
    done = subprocess.run(command + [url], capture_output=True, text=True, timeout=seconds + 60, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed: {done.stderr[-500:]}")
    return parse_wrk(done.stdout)


def paced(url: str, seconds: float, headers: dict[str, str], script: Path, rate: int) -> dict[str, Any]:
    """`rate` requests/s from PACED_CONNECTIONS connections that each wait between requests (wrk has no rate
    option; the wait is set from a short probe so the achieved rate lands near `rate`). Latency counts from
    each request's send: below saturation that is the service time a client sees."""
    delay = PACED_CONNECTIONS * 1000.0 / rate
    probe = wrk(url, 1, PACED_CONNECTIONS, headers, delay_ms=delay, script=script)
    # each connection's cycle is its wait plus the answer: correct the wait by what the probe achieved
    cycle = PACED_CONNECTIONS * 1000.0 / max(probe["throughput_rps"], 1.0)
    delay = max(0.0, delay - (cycle - delay))
    result = wrk(url, seconds, PACED_CONNECTIONS, headers, delay_ms=delay, script=script)
    return {**result, "target_rps": rate, "delay_ms": round(delay, 2)}


def _start_bare(database_url: str, folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")}
    env["BARE_DATABASE_URL"] = database_url
    process = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "uvicorn",
            "bench.bare_app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        cwd=ROOT,
        env=env,
        stdout=open(folder / "bare.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    return process, f"http://127.0.0.1:{port}"


def _wait_ok(url: str, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200 within {timeout} s")


def run(size: Size, assets: Assets, folder: Path, pool: ServicePool) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    modes, skipped = pool.modes(("postgres",))
    if not modes:
        return {
            "title": TITLE,
            "skipped": "; ".join(skipped.values()),
            "command": command_for("readpath", size.name),
            "tables": [],
            "targets": [],
            "notes": [],
        }
    if shutil.which("wrk") is None:
        return {
            "title": TITLE,
            "skipped": "wrk is not installed (Debian: apt-get install wrk)",
            "command": command_for("readpath", size.name),
            "tables": [],
            "targets": [],
            "notes": [],
        }
    assets.model(MODEL, size.base_epochs)
    ready = pool.get("postgres", assets, MODEL)
    service = ready["service"]
    job = service.run_job(
        {
            "model_id": ready["model_id"],
            "dataset_id": ready["train_id"],
            "eval_dataset_id": ready["test_id"],
            "stages": [{"method": "quantize", "scheme": "dynamic_int8"}],
            "example_input_shape": [64, int(assets.x_train.shape[1])],
        }
    )["job"]
    script = folder / "pace.lua"
    script.write_text(PACING_SCRIPT)
    bare, bare_url = _start_bare(service.env["MODELPRESS_DATABASE_URL"], folder)
    try:
        _wait_ok(f"{bare_url}/row/{job['id']}")
        auth = {"Authorization": f"Bearer {service.key}"}
        endpoints = {
            "bare": (f"{bare_url}/row/{job['id']}", {}),
            "job": (f"{service.base_url}/v1/jobs/{job['id']}", auth),
            "list": (f"{service.base_url}/v1/jobs?limit={LIST_LIMIT}", auth),
        }
        sizes = {
            name: len(service.client.get(url, headers=headers).content) if name != "bare" else None
            for name, (url, headers) in endpoints.items()
        }
        load_before = os.getloadavg()[0]
        rounds = 1 if size.name == "tiny" else 3
        seconds = max(1.0, size.api_seconds / 2)
        closed: dict[str, list[dict[str, Any]]] = {name: [] for name in endpoints}
        for index in range(rounds):  # interleaved, so drifting load on the box hits all three alike
            log(
                f"readpath: closed-loop round {index + 1}/{rounds}, {CLOSED_CONNECTIONS} connections, {seconds:.0f} s each"
            )
            for name, (url, headers) in endpoints.items():
                closed[name].append(wrk(url, seconds, CLOSED_CONNECTIONS, headers))
        paced_results: dict[str, dict[str, Any]] = {}
        for name, (url, headers) in endpoints.items():
            log(f"readpath: {name} paced at {PACED_RATE} req/s for {size.api_seconds:.0f} s")
            paced_results[name] = paced(url, size.api_seconds, headers, script, PACED_RATE)
        load = (load_before, os.getloadavg()[0])
    finally:
        bare.terminate()
        try:
            bare.wait(10)
        except subprocess.TimeoutExpired:
            bare.kill()
    return _section(size, closed, paced_results, sizes, skipped, load)


TITLE = "4b. Read path: job reads against a bare FastAPI endpoint on the same Postgres (wrk)"
LABELS = {
    "bare": "bare FastAPI, one row (no auth)",
    "job": "GET /v1/jobs/{id} (authenticated)",
    "list": f"GET /v1/jobs?limit={LIST_LIMIT} (authenticated)",
}


def _section(
    size: Size,
    closed: dict[str, list[dict[str, Any]]],
    paced_results: dict[str, dict[str, Any]],
    sizes: dict[str, int | None],
    skipped: dict[str, str],
    load: tuple[float, float],
) -> dict[str, Any]:
    cpus = os.cpu_count()
    throughput = {name: statistics.median(r["throughput_rps"] for r in runs) for name, runs in closed.items()}
    rows, targets = [], []
    for name, runs in closed.items():
        share = throughput[name] / throughput["bare"] if throughput["bare"] else None
        p = paced_results[name]
        rows.append(
            [
                LABELS[name],
                fmt(throughput[name], 0, " req/s"),
                "1.00" if name == "bare" else fmt(share, 2),
                fmt(statistics.median(r["p50_ms"] for r in runs), 2, " ms"),
                fmt(statistics.median(r["p99_ms"] for r in runs), 2, " ms"),
                fmt(p["throughput_rps"], 0, " req/s"),
                fmt(p["p50_ms"], 2, " ms"),
                fmt(p["p99_ms"], 2, " ms"),
                sum(r["errors"] for r in runs) + p["errors"],
            ]
        )
        if name == "bare":
            continue
        assert share is not None
        targets.append(
            {
                "target": f"{LABELS[name]} throughput ≥ {THROUGHPUT_SHARE_TARGET:.0%} of the bare endpoint's "
                f"(Postgres, {cpus} cores)",
                "measured": f"{share:.2f} ({throughput[name]:.0f} vs {throughput['bare']:.0f} req/s)",
                "met": share >= THROUGHPUT_SHARE_TARGET,
            }
        )
        held = p["p99_ms"] < P99_TARGET_MS and p["errors"] == 0 and p["throughput_rps"] >= 0.95 * PACED_RATE
        targets.append(
            {
                "target": f"{LABELS[name]} p99 < {P99_TARGET_MS:.0f} ms at {PACED_RATE} req/s on {cpus} cores",
                "measured": f"p99 {p['p99_ms']:.1f} ms at {p['throughput_rps']:.0f} req/s achieved",
                "met": held,
            }
        )
    notes = [f"{mode} mode left out: {why}" for mode, why in skipped.items()]
    notes += [
        f"Closed loop: wrk, {WRK_THREADS} thread, {CLOSED_CONNECTIONS} connections, {len(closed['bare'])} rounds "
        "interleaved across the three endpoints; the table gives medians of the rounds. Paced: "
        f"{PACED_CONNECTIONS} connections that each wait between requests so the total lands near {PACED_RATE} "
        "req/s (wrk has no rate option; the achieved rate is shown); latency is from each request's send.",
        "Everything shares the box's cores: the API (one uvicorn process), Postgres, Redis, the idle Celery worker "
        f"and wrk itself. The box's 1-minute load average was {load[0]:.1f} before the rounds and {load[1]:.1f} "
        f"after them ({cpus} cores): above {cpus} means other work was queued for the cores, so absolute figures "
        "are inflated and only the side-by-side shares compare.",
        "Payloads: "
        + ", ".join(f"{LABELS[n]} {b} bytes" for n, b in sizes.items() if b is not None)
        + "; the bare endpoint answers a few columns of the job's row.",
    ]
    return {
        "title": TITLE,
        "intro": (
            "The API as deployed in production mode (Postgres + Redis), each request carrying an API key and "
            "counted by the rate limiter (in Redis), next to a bare FastAPI endpoint (bench/bare_app.py: no "
            "authentication, SQLAlchemy Core, one indexed SELECT) on the same database and the same uvicorn."
        ),
        "command": command_for("readpath", size.name),
        "tables": [
            {
                "title": "Throughput (closed loop) and latency at a fixed rate",
                "columns": [
                    "endpoint",
                    "throughput",
                    "share of bare",
                    "p50",
                    "p99",
                    f"paced ({PACED_RATE} req/s) achieved",
                    "paced p50",
                    "paced p99",
                    "errors",
                ],
                "rows": rows,
            }
        ],
        "targets": targets,
        "notes": notes,
        "data": {
            "closed": closed,
            "paced": paced_results,
            "response_bytes": sizes,
            "mode": MODE_LABELS["postgres"],
            "load_average": load,
        },
    }
