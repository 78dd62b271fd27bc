"""Section 4: the HTTP API on loopback: GET /v1/jobs/{id} latency and throughput, and a large upload.

The API runs as it is deployed, a uvicorn process (one worker), with a real Celery worker
next to it; the load comes from this process with an httpx async client, bounded in both
request count and time. The upload streams a file of the given size through the
multipart endpoint while the API process's resident memory is watched.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Assets, Size, command_for, fmt, log, percentile
from bench.harness import MODE_LABELS, Service, ServicePool, read_status_kib

MODEL = "lenet-300-100"
P99_TARGET_MS = 50.0
TARGET_RATE = 200
RSS_TARGET_MIB = 100.0
MAX_IN_FLIGHT = 64


REQUEST_TIMEOUT_S = 10.0
GRACE_S = 10.0


async def _closed_loop(
    base_url: str, headers: dict[str, str], path: str, concurrency: int, seconds: float
) -> dict[str, Any]:
    """`concurrency` clients, each sending the next request when the last one is answered, for `seconds`."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    errors = 0
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, limits=limits, timeout=REQUEST_TIMEOUT_S
    ) as client:
        await _warm(client, path)
        started = time.perf_counter()
        deadline = started + seconds

        async def client_loop() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                sent = time.perf_counter()
                try:
                    ok = (await client.get(path)).status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - sent)
                errors += 0 if ok else 1

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "seconds": round(elapsed, 3),
        "requests": len(latencies),
        "errors": errors,
        "throughput_rps": round((len(latencies) - errors) / elapsed, 1),
        **_percentiles(latencies),
    }


async def _warm(client: Any, path: str) -> None:
    import httpx

    for _ in range(10):  # open connections, warm caches
        try:
            await client.get(path)
        except httpx.HTTPError:
            pass


async def _open_loop(base_url: str, headers: dict[str, str], path: str, rate: int, seconds: float) -> dict[str, Any]:
    """Requests sent on a fixed schedule of `rate` per second, whatever the answers do (at most MAX_IN_FLIGHT
    open); latency counts from the scheduled send time, so a server that falls behind is not flattered.
    Requests still open GRACE_S after the last scheduled send are abandoned and counted as errors, their
    latency as the time until then (a lower bound)."""
    import httpx

    count = max(1, int(rate * seconds))
    limits = httpx.Limits(max_connections=MAX_IN_FLIGHT, max_keepalive_connections=MAX_IN_FLIGHT)
    gate = asyncio.Semaphore(MAX_IN_FLIGHT)
    outcomes: dict[int, tuple[float, float, bool, float]] = {}
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, limits=limits, timeout=REQUEST_TIMEOUT_S
    ) as client:
        await _warm(client, path)
        start = time.perf_counter() + 0.05

        async def one(index: int) -> None:
            scheduled = start + index / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            async with gate:
                sent = time.perf_counter()
                try:
                    ok = (await client.get(path)).status_code == 200
                except httpx.HTTPError:
                    ok = False
                done = time.perf_counter()
            outcomes[index] = (done - scheduled, done - sent, ok, done)

        tasks = [asyncio.ensure_future(one(i)) for i in range(count)]
        _, pending = await asyncio.wait(tasks, timeout=seconds + GRACE_S + 0.05)
        abandoned_at = time.perf_counter()
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for index in range(count):
        if index not in outcomes:
            lower = abandoned_at - (start + index / rate)
            outcomes[index] = (lower, lower, False, abandoned_at)
    results = list(outcomes.values())
    finished = max(r[3] for r in results if r[2]) if any(r[2] for r in results) else abandoned_at
    answered = sum(1 for r in results if r[2])
    corrected = [r[0] for r in results]
    service_time = [r[1] for r in results]
    return {
        "target_rps": rate,
        "requests": count,
        "errors": count - answered,
        "abandoned": len(pending),
        "achieved_rps": round(answered / max(finished - start, 1e-9), 1),
        "sent_late": sum(1 for r in results if r[0] - r[1] > 0.005),
        **_percentiles(corrected),
        **{f"service_{k}": v for k, v in _percentiles(service_time).items()},
    }


def _drain(service: Service, timeout: float = 60.0) -> float:
    """Wait until the API answers /healthz quickly again (an overloaded API keeps working off its backlog)."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        t0 = time.perf_counter()
        try:
            if service.client.get("/healthz", timeout=5.0).status_code == 200 and time.perf_counter() - t0 < 0.1:
                break
        except Exception:
            pass
        time.sleep(0.2)
    return round(time.perf_counter() - started, 2)


def _percentiles(values: list[float]) -> dict[str, float | None]:
    def ms(q: float) -> float | None:
        value = percentile(values, q)
        return None if value is None else round(value * 1e3, 2)

    return {"p50_ms": ms(0.5), "p90_ms": ms(0.9), "p99_ms": ms(0.99), "max_ms": ms(1.0)}


def write_npz(path: Path, size_bytes: int) -> int:
    """An uncompressed .npz whose `inputs` array is `size_bytes` of float32, written without holding it in memory."""
    columns = 1024
    rows = max(1, size_bytes // (4 * columns))
    chunk = np.zeros((max(1, min(rows, 4096)), columns), dtype=np.float32).tobytes()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("inputs.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(
                member, {"descr": "<f4", "fortran_order": False, "shape": (rows, columns)}
            )
            remaining = rows * columns * 4
            while remaining > 0:
                piece = chunk[:remaining]
                member.write(piece)
                remaining -= len(piece)
    return path.stat().st_size


def _upload(service: Service, path: Path) -> dict[str, Any]:
    """Stream `path` to POST /v1/datasets; the API process's RSS is sampled and its high-water mark read."""
    assert service.api is not None
    pid = service.api.pid
    baseline = read_status_kib(pid, "VmRSS") or 0
    peak_reset = False
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        peak_reset = True
    except OSError:
        pass
    hwm_before = read_status_kib(pid, "VmHWM") or 0
    sampled = [baseline]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            rss = read_status_kib(pid, "VmRSS")
            if rss:
                sampled.append(rss)
            stop.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    try:
        with open(path, "rb") as handle:
            response = service.client.post("/v1/datasets", files={"file": (path.name, handle)})
    finally:
        elapsed = time.perf_counter() - started
        stop.set()
        sampler.join(5)
    if response.status_code != 201:
        raise RuntimeError(f"upload answered {response.status_code}: {response.text[:300]}")
    hwm_after = read_status_kib(pid, "VmHWM") or 0
    peak = max(max(sampled), hwm_after if peak_reset else 0)
    service.client.delete(f"/v1/datasets/{response.json()['id']}")
    size = path.stat().st_size
    return {
        "bytes": size,
        "seconds": round(elapsed, 3),
        "throughput_mib_s": round(size / 2**20 / elapsed, 1),
        "rss_before_mib": round(baseline / 1024, 1),
        "rss_peak_mib": round(peak / 1024, 1),
        "rss_growth_mib": round((peak - baseline) / 1024, 1),
        "hwm_reset": peak_reset,
        "hwm_before_mib": round(hwm_before / 1024, 1),
        "samples": len(sampled),
    }


SWEEP_RATES = (50, 100, 150)
SWEEP_SECONDS = 3.0
RECOVERY_WAIT_S = 20.0


def _meets(opened: dict[str, Any]) -> bool:
    return (
        opened["p99_ms"] is not None
        and opened["p99_ms"] < P99_TARGET_MS
        and opened["errors"] == 0
        and opened["achieved_rps"] >= 0.95 * opened["target_rps"]
    )


def run(size: Size, assets: Assets, folder: Path, pool: ServicePool) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    assets.model(MODEL, size.base_epochs)
    modes, skipped = pool.modes(size.api_modes)
    per_mode: dict[str, dict[str, Any]] = {}
    upload: dict[str, Any] | None = None
    for mode in modes:
        log(f"api: {mode} mode")
        ready = pool.get(mode, assets, MODEL)
        service: Service = ready["service"]
        if upload is None:  # first, on a service with no backlog
            file = folder / "upload.npz"
            log(f"api: {mode} upload of {size.upload_bytes / 2**20:.0f} MiB")
            write_npz(file, size.upload_bytes)
            try:
                upload = {"mode": mode, **_upload(service, file)}
            finally:
                file.unlink(missing_ok=True)
        job = service.run_job(
            {
                "model_id": ready["model_id"],
                "dataset_id": ready["train_id"],
                "eval_dataset_id": ready["test_id"],
                "stages": [{"method": "quantize", "scheme": "static_int8"}],
                "example_input_shape": [64, int(assets.x_train.shape[1])],
            }
        )["job"]
        path = f"/v1/jobs/{job['id']}"
        body_bytes = len(service.client.get(path).content)
        headers = {"Authorization": f"Bearer {service.key}"}
        log(f"api: {mode} closed loop, concurrency {size.api_concurrency}, {size.api_seconds / 2:.1f} s")
        closed = asyncio.run(_closed_loop(service.base_url, headers, path, size.api_concurrency, size.api_seconds / 2))
        _drain(service, 15.0)
        sweep = []
        for rate in (r for r in SWEEP_RATES if r < size.api_rate):
            seconds = min(SWEEP_SECONDS, size.api_seconds / 2)
            log(f"api: {mode} open loop, {rate} requests/s for {seconds} s")
            sweep.append(asyncio.run(_open_loop(service.base_url, headers, path, rate, seconds)))
            if not _meets(sweep[-1]):
                break  # higher rates only pile up a longer backlog
            _drain(service, 15.0)
        log(f"api: {mode} open loop, {size.api_rate} requests/s for {size.api_seconds} s")
        opened = asyncio.run(_open_loop(service.base_url, headers, path, size.api_rate, size.api_seconds))
        recovered = _drain(service, RECOVERY_WAIT_S)
        per_mode[mode] = {
            "closed_loop": closed,
            "open_loop": opened,
            "sweep": sweep,
            "response_bytes": body_bytes,
            "recovery_s": recovered,
            "recovered": recovered < RECOVERY_WAIT_S,
        }
        pool.release(mode)  # the last section that uses it; also drops any backlog left from overload
    return _section(size, per_mode, upload, skipped)


def _section(
    size: Size, per_mode: dict[str, dict[str, Any]], upload: dict[str, Any] | None, skipped: dict[str, str]
) -> dict[str, Any]:
    cpus = os.cpu_count()
    rows, targets = [], []
    notes_extra: list[str] = []
    for mode, figures in per_mode.items():
        closed, opened = figures["closed_loop"], figures["open_loop"]
        rows.append(
            [
                MODE_LABELS[mode],
                f"closed loop, {closed['concurrency']} concurrent",
                fmt(closed["throughput_rps"], 0, " req/s"),
                fmt(closed["p50_ms"], 1, " ms"),
                fmt(closed["p99_ms"], 1, " ms"),
                closed["requests"],
                closed["errors"],
            ]
        )
        if opened["errors"]:
            notes_extra.append(
                f"{MODE_LABELS[mode]}, open loop: {opened['errors']} of {opened['requests']} requests "
                f"failed or timed out ({opened['abandoned']} still unanswered {GRACE_S:.0f} s after the "
                f"last send); their latency counts up to then, so p99 is a lower bound. Afterwards the "
                "API "
                + (
                    f"took {figures['recovery_s']} s to answer /healthz promptly again."
                    if figures["recovered"]
                    else f"still had not worked off its backlog {RECOVERY_WAIT_S:.0f} s later."
                )
            )
        for point in figures.get("sweep", []):
            rows.append(
                [
                    MODE_LABELS[mode],
                    f"open loop, {point['target_rps']} req/s scheduled, "
                    f"{point['requests'] / point['target_rps']:.1f} s",
                    fmt(point["achieved_rps"], 0, " req/s"),
                    fmt(point["p50_ms"], 1, " ms"),
                    fmt(point["p99_ms"], 1, " ms"),
                    point["requests"],
                    point["errors"],
                ]
            )
        rows.append(
            [
                MODE_LABELS[mode],
                f"open loop, {opened['target_rps']} req/s scheduled, {size.api_seconds:.1f} s",
                fmt(opened["achieved_rps"], 0, " req/s"),
                fmt(opened["p50_ms"], 1, " ms"),
                fmt(opened["p99_ms"], 1, " ms"),
                opened["requests"],
                opened["errors"],
            ]
        )
        sustained = [p["target_rps"] for p in figures.get("sweep", []) + [opened] if _meets(p)]
        figures["highest_rate_meeting_p99"] = max(sustained) if sustained else None
        if opened["target_rps"] >= TARGET_RATE:
            measured = f"p99 {opened['p99_ms']} ms at {opened['achieved_rps']} req/s achieved"
            if not _meets(opened):
                measured += "; p99 < 50 ms held up to " + (
                    f"{max(sustained)} req/s" if sustained else f"none of {', '.join(map(str, SWEEP_RATES))} req/s"
                )
            targets.append(
                {
                    "target": f"GET /v1/jobs/{{id}} p99 < {P99_TARGET_MS:.0f} ms at {TARGET_RATE} req/s on "
                    f"{cpus} cores ({MODE_LABELS[mode]})",
                    "measured": measured,
                    "met": _meets(opened),
                }
            )
    tables = [
        {
            "title": "GET /v1/jobs/{id} on loopback",
            "caption": (
                "Closed loop: N clients each send the next request when the last is answered "
                "(throughput at fixed concurrency). Open loop: requests leave on a fixed schedule and "
                "latency counts from the scheduled time (no coordinated omission). Payload: a finished "
                "static_int8 job with its metrics document, "
                + ", ".join(f"{f['response_bytes']} bytes ({m})" for m, f in per_mode.items())
                + "."
            ),
            "columns": ["mode", "load", "throughput", "p50", "p99", "requests", "errors"],
            "rows": rows,
        }
    ]
    if upload is not None:
        tables.append(
            {
                "title": f"Upload of a {upload['bytes'] / 2**20:.0f} MiB dataset (POST /v1/datasets)",
                "columns": ["mode", "size", "wall time", "throughput", "API RSS before", "API RSS peak", "growth"],
                "rows": [
                    [
                        MODE_LABELS[upload["mode"]],
                        f"{upload['bytes'] / 2**20:.0f} MiB",
                        fmt(upload["seconds"], 2, " s"),
                        fmt(upload["throughput_mib_s"], 0, " MiB/s"),
                        fmt(upload["rss_before_mib"], 0, " MiB"),
                        fmt(upload["rss_peak_mib"], 0, " MiB"),
                        fmt(upload["rss_growth_mib"], 1, " MiB"),
                    ]
                ],
            }
        )
        targets.append(
            {
                "target": f"API peak RSS growth < {RSS_TARGET_MIB:.0f} MiB during a "
                f"{upload['bytes'] / 2**20:.0f} MiB upload",
                "measured": f"{upload['rss_growth_mib']} MiB",
                "met": upload["rss_growth_mib"] < RSS_TARGET_MIB,
            }
        )
    notes = [f"{mode} mode left out: {why}" for mode, why in skipped.items()] + notes_extra
    notes += [
        "At 200 req/s the API runs close to what this box gives it (see the closed-loop throughput): when it "
        "keeps up, p99 stays in single-digit milliseconds; once it falls behind, the backlog grows for the rest "
        "of the run. Which of the two happens at the target rate varies from run to run on this shared box; "
        "the lower rates show what is held with margin.",
        "The load generator (Python, httpx) runs on the same cores as the API and the worker, so the API "
        "had less than the whole machine.",
        "RSS peak is the larger of /proc/<pid>/status VmHWM (reset through clear_refs just before the upload) "
        "and VmRSS sampled every 20 ms; the file goes from the client through the multipart parser's spooled "
        "temporary file to the storage backend in 1 MiB chunks, hashed on the way.",
    ]
    if size.upload_bytes < 2**30:
        notes.append(
            f"The upload is {size.upload_bytes / 2**20:.0f} MiB at size {size.name}; `--size full` sends 1 GiB."
        )
    return {
        "title": "4. API: job reads under load, and a large upload",
        "intro": (
            f"A uvicorn API process (one worker) with a real Celery worker beside it, on loopback, "
            f"{cpus} cores shared by everything. Requests carry an API key (looked up by its SHA-256 hash on "
            "every request) and go through the rate limiter, as in production."
        ),
        "command": command_for("api", size.name),
        "tables": tables,
        "targets": targets,
        "notes": notes,
        "data": {"modes": per_mode, "upload": upload, "skipped_modes": skipped},
    }
