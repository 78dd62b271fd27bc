"""Section 5 (GPU): `python -m bench.gpu` — torchao schemes and 2:4 sparsity against bf16, one call.

On a machine with CUDA (sized to finish in under five minutes on an H200), for a
4096×4096 MLP (Linear 4096→4096, ReLU, Linear 4096→4096) and a small transformer block
(d=1024, 16 heads, FFN 4096), at 16 tokens (decode-like) and 4096 tokens (prefill-like):

- int8 weight-only, int8 dynamic, int4 weight-only and float8 (torchao `quantize_`, with the
  configs the ModelPress engine uses) against the bf16 model: latency eager and under
  torch.compile, SQNR of the outputs against bf16, weight bytes;
- 2:4 semi-structured sparsity (`torch.sparse.to_sparse_semi_structured`, the call the
  engine's nm_semi_structured scheme makes on CUDA) against the dense bf16 model, and the
  engine's own prune stage run once on CUDA.

It writes its section into BENCHMARKS.md and bench/results.json. Without CUDA it prints
why it skipped and exits 0. `--device cpu` runs the same code on tiny shapes on the CPU
(no compile) to check it still runs; those figures are meaningless and never written.
"""

from __future__ import annotations

import argparse
import copy
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SCHEMES = ("int8_weight_only", "int8_dynamic", "int4_weight_only", "float8")
DEFAULT_BUDGET_S = 270.0
COMMAND = "python -m bench.gpu"
INTRO = (
    "One call of `python -m bench.gpu` on a machine with CUDA, sized to finish in under five minutes on an H200: "
    "torchao int8 weight-only, int8 dynamic, int4 weight-only and float8 (the configs of ModelPress's CUDA "
    "schemes) against bf16, eager and under torch.compile, for a 4096×4096 MLP (two Linear layers) and a "
    "small transformer block (d=1024, 16 heads, FFN 4096), at 16 tokens (decode-like) and 4096 tokens "
    "(prefill-like); and 2:4 semi-structured sparsity (torch.sparse.to_sparse_semi_structured, the call of "
    "ModelPress's nm_semi_structured scheme on CUDA) against the dense bf16 model."
)


def _mlp(width: int) -> Any:
    from torch import nn

    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))


def _block(d_model: int, heads: int, ffn: int) -> Any:
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        """Pre-norm transformer block whose matrices are all nn.Linear (what quantize_ swaps)."""

        def __init__(self) -> None:
            super().__init__()
            self.heads = heads
            self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
            self.qkv, self.proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
            self.up, self.down = nn.Linear(d_model, ffn), nn.Linear(ffn, d_model)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            batch, tokens, width = x.shape
            q, k, v = self.qkv(self.norm1(x)).view(batch, tokens, 3, self.heads, width // self.heads).unbind(2)
            attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            x = x + self.proj(attended.transpose(1, 2).reshape(batch, tokens, width))
            return x + self.down(F.gelu(self.up(self.norm2(x))))

    return Block()


def _shapes(quick: bool) -> dict[str, dict[str, Any]]:
    if quick:
        return {
            "mlp": {
                "label": "MLP 256×256",
                "build": lambda: _mlp(256),
                "inputs": {"16 tokens": (16, 256), "256 tokens": (256, 256)},
            },
            "block": {
                "label": "transformer block d=128",
                "build": lambda: _block(128, 4, 512),
                "inputs": {"16 tokens": (16, 1, 128), "256 tokens": (2, 128, 128)},
            },
        }
    return {
        "mlp": {
            "label": "MLP 4096×4096 (2 layers)",
            "build": lambda: _mlp(4096),
            "inputs": {"16 tokens": (16, 4096), "4096 tokens": (4096, 4096)},
        },
        "block": {
            "label": "transformer block d=1024, 16 heads, FFN 4096",
            "build": lambda: _block(1024, 16, 4096),
            "inputs": {"16 tokens": (16, 1, 1024), "4096 tokens": (8, 512, 1024)},
        },
    }


def _time_ms(fn: Callable[[Any], Any], x: Any, device: str, iterations: int = 30, repeats: int = 5) -> float:
    import torch

    if device != "cuda":  # a code-path check: one short loop is enough
        iterations, repeats = 2, 1
    with torch.inference_mode():
        for _ in range(3):
            fn(x)
        if device == "cuda":
            torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iterations):
                    fn(x)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / iterations)
            else:
                started = time.perf_counter()
                for _ in range(iterations):
                    fn(x)
                times.append((time.perf_counter() - started) * 1e3 / iterations)
    return round(statistics.median(times), 4)


def _sqnr(reference: Any, output: Any) -> float | None:
    import math

    reference, output = reference.float(), output.float()
    noise = float((reference - output).pow(2).mean())
    return None if noise == 0 else round(10 * math.log10(float(reference.pow(2).mean()) / noise), 2)


def _state_bytes(model: Any) -> int | None:
    import torch

    try:
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        return buffer.getbuffer().nbytes
    except Exception:
        return None


def _config(scheme: str) -> Any:
    """The torchao config the ModelPress engine uses for `scheme` (worker/compression/quantization/torchao_cuda.py)."""
    from worker.compression.quantization import _torchao_config

    return _torchao_config(scheme, {})


def _error(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:240]


def run_benchmarks(
    device: str = "cuda", *, quick: bool = False, compile: bool = True, budget_s: float = DEFAULT_BUDGET_S
) -> dict[str, Any]:
    import torch
    from torchao.quantization import quantize_

    deadline = time.monotonic() + budget_s
    dtype = torch.bfloat16
    rows: list[dict[str, Any]] = []
    sparse_rows: list[dict[str, Any]] = []
    skipped_for_time: list[str] = []
    for spec in _shapes(quick).values():
        torch.manual_seed(0)
        base = spec["build"]().to(device=device, dtype=dtype).eval()
        inputs = {name: torch.randn(shape, device=device, dtype=dtype) for name, shape in spec["inputs"].items()}
        with torch.inference_mode():
            references = {name: base(x) for name, x in inputs.items()}
        baseline: dict[str, dict[str, float | None]] = {}
        for scheme in ("bf16",) + SCHEMES:
            if time.monotonic() > deadline:
                skipped_for_time.append(f"{spec['label']} {scheme}")
                continue
            row: dict[str, Any] = {"model": spec["label"], "scheme": scheme, "by_input": {}}
            try:
                model = copy.deepcopy(base)
                started = time.perf_counter()
                if scheme != "bf16":
                    quantize_(model, _config(scheme))
                row["quantize_s"] = round(time.perf_counter() - started, 3)
                row["weight_bytes"] = _state_bytes(model)
            except Exception as error:
                row["error"] = _error(error)
                rows.append(row)
                continue
            compiled = None
            if compile:
                try:
                    compiled = torch.compile(model, dynamic=False)
                except Exception as error:
                    row["compile_error"] = _error(error)
            for name, x in inputs.items():
                figures: dict[str, Any] = {}
                try:
                    with torch.inference_mode():
                        figures["sqnr_db"] = None if scheme == "bf16" else _sqnr(references[name], model(x))
                    figures["eager_ms"] = _time_ms(model, x, device)
                except Exception as error:
                    figures["eager_error"] = _error(error)
                if compiled is not None and time.monotonic() < deadline:
                    try:
                        started = time.perf_counter()
                        with torch.inference_mode():
                            compiled(x)
                        figures["compile_s"] = round(time.perf_counter() - started, 2)
                        figures["compiled_ms"] = _time_ms(compiled, x, device)
                    except Exception as error:
                        figures["compiled_error"] = _error(error)
                elif compiled is not None:
                    skipped_for_time.append(f"{spec['label']} {scheme} {name} compiled")
                if scheme == "bf16":
                    baseline[name] = {"eager_ms": figures.get("eager_ms"), "compiled_ms": figures.get("compiled_ms")}
                for mode in ("eager", "compiled"):
                    ours, ref = figures.get(f"{mode}_ms"), baseline.get(name, {}).get(f"{mode}_ms")
                    figures[f"{mode}_speedup"] = round(ref / ours, 3) if ours and ref else None
                row["by_input"][name] = figures
            rows.append(row)
            if device == "cuda":
                torch._dynamo.reset()
                torch.cuda.empty_cache()
        if time.monotonic() < deadline:
            sparse_rows += _semi_structured(base, inputs, references, spec["label"], device)
        else:
            skipped_for_time.append(f"{spec['label']} 2:4")
    engine_check = _engine_nm_stage(device, quick) if time.monotonic() < deadline else {"skipped": "time budget"}
    return {
        "rows": rows,
        "sparse_rows": sparse_rows,
        "engine_nm_stage": engine_check,
        "skipped_for_time": skipped_for_time,
        "budget_s": budget_s,
    }


def _semi_structured(
    base: Any, inputs: dict[str, Any], references: dict[str, Any], label: str, device: str
) -> list[dict[str, Any]]:
    """2:4 masks (the engine's nm_mask) on every Linear, then to_sparse_semi_structured, against dense bf16."""
    import torch
    from torch import nn
    from torch.sparse import to_sparse_semi_structured

    from worker.compression.pruning import nm_mask

    sparse = copy.deepcopy(base)
    converted, failed = [], []
    for name, module in sparse.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        with torch.no_grad():
            module.weight.mul_(nm_mask(module.weight, 2, 4))
            try:
                module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach()), requires_grad=False)
                converted.append(name)
            except Exception as error:
                failed.append(f"{name}: {_error(error)}")
    out = []
    for name, x in inputs.items():
        row: dict[str, Any] = {"model": label, "input": name, "converted": converted, "not_converted": failed}
        try:
            row["dense_ms"] = _time_ms(base, x, device)
            row["sparse_ms"] = _time_ms(sparse, x, device)
            row["speedup"] = round(row["dense_ms"] / row["sparse_ms"], 3) if row["sparse_ms"] else None
            with torch.inference_mode():
                row["sqnr_db_vs_dense"] = _sqnr(references[name], sparse(x))
        except Exception as error:
            row["error"] = _error(error)
        out.append(row)
    return out


def _engine_nm_stage(device: str, quick: bool) -> dict[str, Any]:
    """The engine's own prune stage (nm_semi_structured, 2:4) on a bf16 model on this device, as a job would run it."""
    import torch

    from worker.compression.base import StageContext
    from worker.compression.pruning import run_stage

    width = 256 if quick else 4096
    model = _mlp(width).to(device=device, dtype=torch.bfloat16).eval()
    example = torch.randn(64, width, device=device, dtype=torch.bfloat16)
    try:
        result = run_stage(
            model,
            "nm_semi_structured",
            {"n": 2, "m": 4, "layers": None, "prune_classifier": True, "train": None},
            StageContext(kind="eager", example_input=example, device=torch.device(device)),
        )
        with torch.inference_mode():
            result.model(example)
        return {
            "ok": True,
            "semi_structured_layers": result.info.get("semi_structured_layers"),
            "sparsity": result.info.get("sparsity"),
        }
    except Exception as error:
        return {"ok": False, "error": _error(error)}


def section(
    size_name: str = "full", *, device: str = "cuda", budget_s: float = DEFAULT_BUDGET_S, compile: bool = True
) -> dict[str, Any]:
    """The GPU section for bench.run: measured figures, or a `skipped` reason without CUDA."""
    import torch

    base: dict[str, Any] = {
        "title": "5. GPU: torchao schemes and 2:4 sparsity against bf16",
        "command": COMMAND,
        "tables": [],
        "targets": [],
        "notes": [],
        "data": {},
    }
    if device == "cuda" and not torch.cuda.is_available():
        base["skipped"] = (
            f"no CUDA device on the machine of the last run (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda}); run `{COMMAND}` on a GPU machine to fill this section."
        )
        base["intro"] = INTRO
        return base
    quick = size_name == "tiny" or device != "cuda"
    threads = torch.get_num_threads()
    if device != "cuda":
        torch.set_num_threads(1)
    started = time.perf_counter()
    try:
        figures = run_benchmarks(device, quick=quick, compile=compile and device == "cuda", budget_s=budget_s)
    finally:
        torch.set_num_threads(threads)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (code-path check only)"
    capability = ".".join(map(str, torch.cuda.get_device_capability())) if device == "cuda" else None
    figures.update(
        device_name=name,
        compute_capability=capability,
        seconds=round(time.perf_counter() - started, 1),
        torch=torch.__version__,
        torchao=_torchao_version(),
    )
    return _render(base, figures)


def _torchao_version() -> str | None:
    try:
        import torchao

        return str(torchao.__version__)
    except Exception:
        return None


def _render(base: dict[str, Any], figures: dict[str, Any]) -> dict[str, Any]:
    def ms(value: Any) -> str:
        return "–" if value is None else f"{value:.3f} ms"

    def times(value: Any) -> str:
        return "–" if value is None else f"{value:.2f}×"

    rows = []
    for row in figures["rows"]:
        if "error" in row:
            rows.append([row["model"], "–", row["scheme"], "FAILED", "–", "–", "–", "–", "–", row["error"]])
            continue
        for name, f in row["by_input"].items():
            problems = "; ".join(f[k] for k in ("eager_error", "compiled_error") if k in f)
            rows.append(
                [
                    row["model"],
                    name,
                    row["scheme"],
                    ms(f.get("eager_ms")),
                    times(f.get("eager_speedup")),
                    ms(f.get("compiled_ms")),
                    times(f.get("compiled_speedup")),
                    "–" if f.get("sqnr_db") is None else f"{f['sqnr_db']:.1f} dB",
                    "–" if row.get("weight_bytes") is None else f"{row['weight_bytes'] / 2**20:.1f} MiB",
                    problems or row.get("compile_error", ""),
                ]
            )
    sparse_rows = [
        [
            r["model"],
            r["input"],
            ms(r.get("dense_ms")),
            ms(r.get("sparse_ms")),
            times(r.get("speedup")),
            "–" if r.get("sqnr_db_vs_dense") is None else f"{r['sqnr_db_vs_dense']:.1f} dB",
            f"{len(r['converted'])} converted"
            + (f"; not: {'; '.join(r['not_converted'])}" if r["not_converted"] else "")
            + (f"; {r['error']}" if "error" in r else ""),
        ]
        for r in figures["sparse_rows"]
    ]
    engine = figures["engine_nm_stage"]
    notes = [
        f"Device: {figures['device_name']} (compute capability {figures['compute_capability']}), torch "
        f"{figures['torch']}, torchao {figures['torchao']}; {figures['seconds']} s for the whole call.",
        "Speedups are against the bf16 model in the same mode (eager against eager, compiled against compiled); "
        "torch.compile with default options, static shapes. SQNR compares outputs with the bf16 model's.",
        "ModelPress's engine runs these schemes eagerly inside the job (the artifact is an exported program); "
        "the compiled column is what a user gets by compiling the downloaded model.",
        "The engine's own prune stage (nm_semi_structured 2:4 on CUDA, bf16): "
        + (
            f"ran, converted layers {engine.get('semi_structured_layers')}"
            if engine.get("ok")
            else f"FAILED: {engine.get('error', engine.get('skipped'))}"
        )
        + ".",
    ]
    if figures["skipped_for_time"]:
        notes.append("Left out to stay within the time budget: " + ", ".join(figures["skipped_for_time"]))
    base.update(
        intro=(
            f"On **{figures['device_name']}**. " + INTRO + " int4 weight-only uses tinygemm's tile-packed "
            "format, group 128; float8 is dynamic per-tensor. Latency is the median of CUDA-event-timed loops."
        ),
        tables=[
            {
                "title": f"torchao schemes against bf16 on {figures['device_name']}",
                "columns": [
                    "model",
                    "input",
                    "scheme",
                    "eager",
                    "eager speedup",
                    "compiled",
                    "compiled speedup",
                    "SQNR vs bf16",
                    "weights",
                    "problems",
                ],
                "rows": rows,
            },
            {
                "title": f"2:4 semi-structured sparsity against dense bf16 on {figures['device_name']}",
                "columns": ["model", "input", "dense bf16", "2:4 sparse", "speedup", "SQNR vs dense", "layers"],
                "rows": sparse_rows,
            },
        ],
        notes=notes,
        data=figures,
    )
    return base


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=COMMAND, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cpu: check the code path on tiny shapes (figures not written)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help="stop starting new measurements after this many seconds",
    )
    parser.add_argument("--no-compile", action="store_true", help="eager timings only")
    parser.add_argument("--quick", action="store_true", help="small shapes (size tiny)")
    parser.add_argument("--results", type=Path, default=None, help="results JSON (default bench/results.json)")
    parser.add_argument("--markdown", type=Path, default=None, help="markdown report (default BENCHMARKS.md)")
    args = parser.parse_args(argv)
    result = section(
        "tiny" if args.quick else "full", device=args.device, budget_s=args.budget_s, compile=not args.no_compile
    )
    if result.get("skipped"):
        print(f"bench.gpu: skipped: {result['skipped']}")
        return 0
    for block in result["tables"]:
        from bench.report import table

        print(f"\n{block['title']}\n{table(block['columns'], block['rows'])}")
    if args.device != "cuda":
        print("\nbench.gpu: CPU code-path check only; nothing written")
        return 0
    from bench.common import MARKDOWN_PATH, RESULTS_PATH, finite, load_results, save_results
    from bench.report import render

    results_path, markdown_path = args.results or RESULTS_PATH, args.markdown or MARKDOWN_PATH
    results = load_results(results_path)
    result.update(
        size="tiny" if args.quick else "full",
        seconds=result["data"]["seconds"],
        generated_at=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    )
    results["sections"]["gpu"] = finite(result)
    save_results(finite(results), results_path)
    markdown_path.write_text(render(results))
    print(f"\nbench.gpu: wrote {markdown_path} and {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
