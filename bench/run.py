"""`python -m bench.run [--size tiny|medium|full] [--only SECTION ...]`: run benchmarks, write BENCHMARKS.md.

Sections: quality (compression on digits), peers (ours vs direct library calls),
service (the service's own cost), api (HTTP latency and uploads), readpath (job reads
against a bare FastAPI endpoint, with wrk), gpu (bench/gpu.py;
skipped without CUDA), targets (torch / ONNX Runtime / ExecuTorch artifacts of one model), zoo (every
zoo model against the main CPU schemes). Results of sections not run are kept from bench/results.json,
so `--only` refreshes part of the report.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    MARKDOWN_PATH,
    RESULTS_PATH,
    SIZES,
    environment,
    finite,
    load_results,
    log,
    prepare_assets,
    save_results,
    single_thread,
)

SECTIONS = ("quality", "peers", "service", "api", "readpath", "gpu", "targets", "dynamic_int8", "zoo")
DEFAULT_POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
DEFAULT_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")


def run(
    sections: list[str],
    size_name: str = "full",
    *,
    results_path: Path = RESULTS_PATH,
    markdown_path: Path = MARKDOWN_PATH,
    postgres_url: str | None = DEFAULT_POSTGRES_URL,
    redis_url: str | None = DEFAULT_REDIS_URL,
    require_services: bool = False,
    modes: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Run `sections` at `size_name`, merge them into the results file and rewrite the markdown.

    postgres_url / redis_url None leaves the Postgres + Redis mode out; `require_services`
    makes an unreachable Postgres or Redis an error instead of a skipped mode; `modes`
    ("embedded", "postgres") limits the service modes the service and api sections run.
    """
    import torch

    from bench import report
    from bench.harness import ServicePool

    size = SIZES[size_name]
    threads_before = torch.get_num_threads()
    single_thread()
    results = load_results(results_path)
    work = Path(tempfile.mkdtemp(prefix="modelpress-bench-"))
    started = time.perf_counter()
    pool = ServicePool(
        work / "services",
        postgres_url=postgres_url,
        redis_url=redis_url,
        require_services=require_services,
        allowed_modes=modes,
    )
    try:
        assets = prepare_assets(work / "assets")
        for name in sections:
            section_started = time.perf_counter()
            log(f"section {name} (size {size.name})")
            section = _run_section(name, size, assets, work, pool)
            if name == "gpu" and section.get("skipped") and not results["sections"].get("gpu", {}).get("skipped", True):
                log(f"gpu: {section['skipped']}; keeping the GPU results already in {results_path.name}")
                continue
            section.update(
                size=size.name,
                seconds=round(time.perf_counter() - section_started, 1),
                generated_at=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            )
            results["sections"][name] = finite(section)
            log(f"section {name} done in {section['seconds']} s")
    finally:
        pool.close()
        shutil.rmtree(work, ignore_errors=True)
        torch.set_num_threads(threads_before)
    results.update(
        environment=environment(),
        size=size.name,
        generated_at=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        seconds=round(time.perf_counter() - started, 1),
        sections_run=list(sections),
    )
    results = finite(results)
    save_results(results, results_path)
    markdown_path.write_text(report.render(results))
    log(f"wrote {markdown_path} and {results_path} in {results['seconds']} s")
    return results


def _run_section(name: str, size: Any, assets: Any, work: Path, pool: Any) -> dict[str, Any]:
    if name == "quality":
        from bench import quality

        return quality.run(size, assets)
    if name == "peers":
        from bench import peers

        return peers.run(size, assets)
    if name == "service":
        from bench import service

        return service.run(size, assets, work / "service", pool)
    if name == "api":
        from bench import api

        return api.run(size, assets, work / "api", pool)
    if name == "readpath":
        from bench import readpath

        return readpath.run(size, assets, work / "readpath", pool)
    if name == "gpu":
        from bench import gpu

        return gpu.section(size.name)
    if name == "targets":
        from bench import targets

        return targets.run(size, assets)
    if name == "zoo":
        from bench import zoo_matrix

        return zoo_matrix.run(size, assets)
    if name == "dynamic_int8":
        from bench import dynamic_int8

        return dynamic_int8.run(size, assets)
    raise ValueError(f"unknown section {name!r}; sections: {SECTIONS}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="full",
        help="full: what `make bench` runs; medium: shorter; tiny: the CI smoke size",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS,
        metavar="SECTION",
        help=f"run these sections only ({', '.join(SECTIONS)})",
    )
    parser.add_argument("--results", type=Path, default=RESULTS_PATH, help="JSON results file")
    parser.add_argument("--markdown", type=Path, default=MARKDOWN_PATH, help="markdown report")
    parser.add_argument(
        "--postgres-url",
        default=DEFAULT_POSTGRES_URL,
        help="admin URL of a Postgres server (a database is created and dropped)",
    )
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="Redis server URL")
    parser.add_argument("--no-postgres", action="store_true", help="leave the Postgres + Redis mode out")
    parser.add_argument(
        "--require-services",
        action="store_true",
        help="fail (instead of leaving the mode out) when Postgres or Redis is unreachable",
    )
    args = parser.parse_args(argv)
    sections = list(args.only or SECTIONS)
    run(
        sections,
        args.size,
        results_path=args.results,
        markdown_path=args.markdown,
        postgres_url=None if args.no_postgres else args.postgres_url,
        redis_url=None if args.no_postgres else args.redis_url,
        require_services=args.require_services,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
