"""Every benchmark section at `--size tiny`, so none of them rots.

The figures are not checked against targets (benchmarks are not tests); only that each
section runs, writes its tables and keys, and that its numbers are positive and finite.
Results go to tmp_path: the committed BENCHMARKS.md and bench/results.json are left alone.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.common import PYTHON, ROOT

pytestmark = pytest.mark.slow


def _run(tmp_path: Path, sections: list[str], **kwargs: Any) -> tuple[dict[str, Any], str]:
    from bench.run import run

    results_path, markdown_path = tmp_path / "results.json", tmp_path / "BENCHMARKS.md"
    run(sections, "tiny", results_path=results_path, markdown_path=markdown_path, **kwargs)
    results = json.loads(results_path.read_text())
    return results, markdown_path.read_text()


def _positive(value: Any, what: str) -> None:
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, f"{what} = {value!r}"


def _all_numbers_finite(value: Any, where: str = "") -> None:
    if isinstance(value, float):
        assert math.isfinite(value), where
    elif isinstance(value, dict):
        for key, item in value.items():
            _all_numbers_finite(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _all_numbers_finite(item, f"{where}[{index}]")


def test_quality_peers_and_gpu_sections_run_in_process(tmp_path: Path) -> None:
    results, markdown = _run(tmp_path, ["quality", "peers", "gpu"], postgres_url=None, redis_url=None)
    sections = results["sections"]
    assert set(sections) == {"quality", "peers", "gpu"}
    _all_numbers_finite(results)

    rows = sections["quality"]["data"]["rows"]
    recipes = {row["recipe"] for row in rows}
    for scheme in (
        "prune:l1_unstructured",
        "prune:ln_structured",
        "prune:nm_semi_structured",
        "quantize:dynamic_int8",
        "quantize:static_int8",
        "quantize:fp16",
        "quantize:bf16",
        "distill:hinton",
        "preset cpu-int8",
        "preset deep-compression",
        "preset distill-small",
    ):
        assert scheme in recipes
    for row in rows:
        assert "error" not in row, row
        for key in ("size_ratio", "speedup_b1", "speedup_b64", "compress_s", "accuracy_before", "accuracy_after"):
            _positive(row[key], f"{row['recipe']}.{key}")
    assert any(r["recipe"] == "quantize:dynamic_int8" and r["size_ratio"] > 1.5 for r in rows)

    peers = sections["peers"]["data"]
    assert {r["scheme"] for r in peers["rows"]} >= {"dynamic_int8", "static_int8", "ln_structured"}
    for row in peers["rows"]:
        assert "error" not in row, row
        _positive(row["speedup_b1"], f"{row['how']}.speedup_b1")
        _positive(row["speedup_b64"], f"{row['how']}.speedup_b64")
    assert len(peers["verdicts"]) == 3 and sections["peers"]["targets"][0]["met"] in (True, False)

    gpu = sections["gpu"]
    import torch

    if not torch.cuda.is_available():
        assert "no CUDA device" in gpu["skipped"]

    for needle in (
        "LeNet-300-100",
        "Han",
        "torch.ao",
        "torchao",
        "torch-pruning",
        "make bench",
        "python -m bench.run --only quality --size tiny",
        "| model |",
    ):
        assert needle in markdown, needle


def test_zoo_matrix_section_records_every_cell(tmp_path: Path) -> None:
    results, markdown = _run(tmp_path, ["zoo"], postgres_url=None, redis_url=None)
    section = results["sections"]["zoo"]
    cells = [cell for row in section["matrix"].values() for cell in row.values()]
    # a job either succeeds or is refused at submit by its upload trial: nothing fails in the worker
    assert cells and all(cell["outcome"] in ("ok", "refused") for cell in cells), cells
    for cell in cells:
        if cell["outcome"] == "ok":
            _positive(cell["size_ratio"], "size_ratio")
            _positive(cell["speedup"], "speedup")
        else:
            assert cell["reason"], cell
    assert section["matrix"]["bert (huggingface)"]["dynamic_int8"]["outcome"] == "ok"
    assert section["uploads"]["bert (huggingface)"] == {"model": "bert", "form": "native", "format": "huggingface"}
    assert "The model zoo against the main schemes" in markdown


def test_service_and_api_sections_embedded(tmp_path: Path) -> None:
    results, markdown = _run(tmp_path, ["service", "api"], postgres_url=None, redis_url=None)
    _all_numbers_finite(results)
    service = results["sections"]["service"]["data"]
    embedded = service["modes"]["embedded"]
    _positive(embedded["ratio"], "ratio")
    _positive(embedded["wall_s"], "wall_s")
    assert embedded["queue_jobs"] == 2 and embedded["queue_p50_s"] >= 0 and embedded["queue_p99_s"] >= 0
    assert "postgres" in service["skipped_modes"]
    _positive(service["sandboxed_wall_s"][0], "sandboxed wall")

    api = results["sections"]["api"]["data"]
    closed, opened = api["modes"]["embedded"]["closed_loop"], api["modes"]["embedded"]["open_loop"]
    assert closed["errors"] == 0 and opened["errors"] == 0
    for figures in (closed, opened):
        _positive(figures["p50_ms"], "p50")
        _positive(figures["p99_ms"], "p99")
    _positive(closed["throughput_rps"], "throughput")
    assert api["upload"]["bytes"] >= 20 * 2**20
    _positive(api["upload"]["throughput_mib_s"], "upload throughput")
    assert math.isfinite(api["upload"]["rss_growth_mib"])
    for needle in ("p99", "service", "in-process", "Upload", "queue"):
        assert needle in markdown, needle


@pytest.mark.postgres
@pytest.mark.redis
def test_service_section_with_postgres_and_redis(tmp_path: Path, postgres_server: str, redis_server: str) -> None:
    results, _ = _run(
        tmp_path,
        ["service"],
        postgres_url=postgres_server,
        redis_url=redis_server,
        require_services=True,
        modes=("postgres",),
    )
    modes = results["sections"]["service"]["data"]["modes"]
    assert set(modes) == {"postgres"}
    _positive(modes["postgres"]["ratio"], "ratio")
    assert modes["postgres"]["queue_p99_s"] >= 0


def test_gpu_script_skips_cleanly_or_runs_its_code_path_on_cpu() -> None:
    import torch

    from bench import gpu

    if not torch.cuda.is_available():
        done = subprocess.run([PYTHON, "-m", "bench.gpu"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "skipped" in done.stdout and "CUDA" in done.stdout
    section = gpu.section("tiny", device="cpu", compile=False, budget_s=60)
    titles = [t["title"] for t in section["tables"]]
    assert any("torchao" in t for t in titles) and any("2:4" in t for t in titles)
    schemes = {row["scheme"] for row in section["data"]["rows"]}
    assert schemes == {"bf16", "int8_weight_only", "int8_dynamic", "int4_weight_only", "float8"}
    assert any(row["by_input"] for row in section["data"]["rows"] if row["scheme"] == "bf16")


def test_make_bench_target_and_committed_report() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "\nbench:" in makefile and "-m bench.run" in makefile
    help_text = subprocess.run(
        [sys.executable, "-m", "bench.run", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    ).stdout
    assert "--size" in help_text and "--only" in help_text
    report = ROOT / "BENCHMARKS.md"
    if report.exists():
        text = report.read_text()
        for needle in ("torch.ao", "torch-pruning", "service", "p99", "LeNet-300-100", "make bench"):
            assert needle in text, needle


WRK_OUTPUT = """Running 1s test @ http://127.0.0.1:8000/v1/jobs/x
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.10ms  512.00us   9.80ms   90.00%
    Req/Sec     3.80k   120.00     4.00k    80.00%
  Latency Distribution
     50%    1.95ms
     75%    2.20ms
     90%  650.00us
     99%    1.20s
  3801 requests in 1.00s, 1.20MB read
  Non-2xx or 3xx responses: 3
Requests/sec:   3795.12
Transfer/sec:      1.20MB
"""


def test_wrk_output_is_read_with_its_units() -> None:
    from bench.readpath import parse_wrk

    figures = parse_wrk(WRK_OUTPUT)
    assert figures["throughput_rps"] == 3795.1 and figures["requests"] == 3801 and figures["errors"] == 3
    assert figures["p50_ms"] == 1.95 and figures["p90_ms"] == 0.65 and figures["p99_ms"] == 1200.0
    with pytest.raises(RuntimeError):
        parse_wrk("wrk: connection refused")


@pytest.mark.postgres
@pytest.mark.redis
def test_readpath_section_with_postgres_and_redis(tmp_path: Path, postgres_server: str, redis_server: str) -> None:
    import shutil

    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (apt-get install wrk)")
    results, markdown = _run(
        tmp_path,
        ["readpath"],
        postgres_url=postgres_server,
        redis_url=redis_server,
        require_services=True,
        modes=("postgres",),
    )
    section = results["sections"]["readpath"]
    _all_numbers_finite(results)
    for name in ("bare", "job", "list"):
        _positive(section["data"]["closed"][name][0]["throughput_rps"], f"{name} throughput")
        _positive(section["data"]["paced"][name]["p99_ms"], f"{name} paced p99")
        assert section["data"]["closed"][name][0]["errors"] == 0
    assert len(section["targets"]) == 4 and all(t["met"] in (True, False) for t in section["targets"])
    assert "bare FastAPI" in markdown and "share of bare" in markdown
