"""What every benchmark section shares: sizes, the digits data and models, timing, artifact loading.

All CPU figures are taken with one intra-op thread (`torch.set_num_threads(1)`), as the
service's sandboxed job child runs by default (target.threads = 1), so in-process and
service runs do the same work and other work on the box disturbs them less.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = ROOT / "bench" / "results.json"
MARKDOWN_PATH = ROOT / "BENCHMARKS.md"
PYTHON = sys.executable
THREADS = 1


@dataclass(frozen=True)
class Size:
    """How big each section runs. `full` is what `make bench` runs; `tiny` is the CI smoke size."""

    name: str
    base_epochs: int  # training of the float models on digits
    quality_models: tuple[str, ...]
    quality_stage_epochs: int | None  # overrides the schemes' training budgets (None: service defaults)
    search_trials: int  # accuracy-aware search (MLP only); 0 leaves it out
    latency_budget_s: float  # per model, batch and round
    latency_rounds: int
    peer_models: tuple[str, ...]
    overhead_epochs: int  # the distillation job of the service-cost section (fixed, or the probe)
    overhead_target_s: float | None  # scale its epochs so the job takes about this long in-process
    overhead_repeats: int
    queue_jobs: int
    api_seconds: float
    api_rate: int  # requests/s of the open-loop GET test
    api_concurrency: int
    api_modes: tuple[str, ...]
    upload_bytes: int


SIZES: dict[str, Size] = {
    "tiny": Size(
        "tiny",
        base_epochs=3,
        quality_models=("lenet-300-100",),
        quality_stage_epochs=1,
        search_trials=0,
        latency_budget_s=0.02,
        latency_rounds=1,
        peer_models=("lenet-300-100",),
        overhead_epochs=2,
        overhead_target_s=None,
        overhead_repeats=1,
        queue_jobs=2,
        api_seconds=1.5,
        api_rate=100,
        api_concurrency=4,
        api_modes=("embedded",),
        upload_bytes=20 * 2**20,
    ),
    "medium": Size(
        "medium",
        base_epochs=20,
        quality_models=("lenet-300-100", "lenet5"),
        quality_stage_epochs=None,
        search_trials=6,
        latency_budget_s=0.1,
        latency_rounds=3,
        peer_models=("lenet-300-100", "lenet5"),
        overhead_epochs=40,
        overhead_target_s=10.0,
        overhead_repeats=1,
        queue_jobs=20,
        api_seconds=5.0,
        api_rate=200,
        api_concurrency=8,
        api_modes=("embedded", "postgres"),
        upload_bytes=256 * 2**20,
    ),
    "full": Size(
        "full",
        base_epochs=20,
        quality_models=("lenet-300-100", "lenet5"),
        quality_stage_epochs=None,
        search_trials=8,
        latency_budget_s=0.1,
        latency_rounds=3,
        peer_models=("lenet-300-100", "lenet5"),
        overhead_epochs=40,
        overhead_target_s=10.0,
        overhead_repeats=3,
        queue_jobs=50,
        api_seconds=10.0,
        api_rate=200,
        api_concurrency=8,
        api_modes=("embedded", "postgres"),
        upload_bytes=2**30,
    ),
}

MODELS: dict[str, dict[str, Any]] = {
    "lenet-300-100": {
        "architecture": {"name": "mlp", "kwargs": {"widths": [64, 300, 100, 10]}},
        "label": "LeNet-300-100-style MLP (64-300-100-10)",
    },
    "lenet5": {
        "architecture": {"name": "lenet5", "kwargs": {}},
        "label": "LeNet-5-style CNN (conv 32, conv 64, fc 128, fc 10)",
    },
}


def single_thread() -> None:
    import torch

    torch.set_num_threads(THREADS)


# ---------------------------------------------------------------------------- data and models


@dataclass
class Assets:
    """The digits split, trained float models and the files the engine reads, in one work folder."""

    folder: Path
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    train_path: Path
    test_path: Path
    model_paths: dict[str, Path] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)
    train_seconds: dict[str, float] = field(default_factory=dict)

    def model(self, name: str, epochs: int) -> Any:
        """The float model `name` trained on digits (trained once per folder)."""
        if name not in self.models:
            import torch

            from worker.compression.registry import build_architecture

            torch.manual_seed(0)
            module = build_architecture(MODELS[name]["architecture"]["name"], MODELS[name]["architecture"]["kwargs"])
            started = time.perf_counter()
            _train(module, self.x_train, self.y_train, epochs)
            self.train_seconds[name] = round(time.perf_counter() - started, 3)
            path = self.folder / f"{name}.pt"
            torch.save(module.state_dict(), path)
            self.models[name], self.model_paths[name] = module.eval(), path
        return self.models[name]


def _train(model: Any, inputs: np.ndarray, labels: np.ndarray, epochs: int, seed: int = 0) -> None:
    # the same recipe the tests train with (bench/fixtures.py), so benchmark and test models are alike
    from bench.fixtures import train

    train(model, inputs, labels, epochs=epochs, seed=seed)


def prepare_assets(folder: Path) -> Assets:
    folder.mkdir(parents=True, exist_ok=True)
    from bench.fixtures import digits_split

    x_train, x_test, y_train, y_test = digits_split()
    train_path, test_path = folder / "digits-train.npz", folder / "digits-test.npz"
    np.savez(train_path, inputs=x_train, labels=y_train)
    np.savez(test_path, inputs=x_test, labels=y_test)
    return Assets(folder, x_train, y_train, x_test, y_test, train_path, test_path)


# ---------------------------------------------------------------------------- the engine


def engine_request(
    assets: Assets,
    model_name: str,
    stages: list[dict[str, Any]],
    artifact: Path,
    *,
    example_batch: int = 64,
    threads: int = THREADS,
) -> Any:
    """The JobRequest the worker would build for these stages (validated and defaulted by the catalogue)."""
    from modelpress.catalog import JobFacts, validate_stages
    from worker.compression.pipeline import JobRequest, ModelRef

    facts = JobFacts(model_format="state_dict", has_dataset=True, dataset_has_labels=True, eval_has_labels=True)
    validated = validate_stages([dict(s) for s in stages], facts)
    return JobRequest(
        model=ModelRef(str(assets.model_paths[model_name]), "state_dict", MODELS[model_name]["architecture"]),
        stages=[v.config for v in validated],
        artifact_path=str(artifact),
        example_input_shape=[example_batch, int(assets.x_train.shape[1])],
        dataset_path=str(assets.train_path),
        eval_dataset_path=str(assets.test_path),
        threads=threads,
    )


def run_engine(request: Any) -> dict[str, Any]:
    """pipeline.run_job in this process; adds wall time and the time spent in the stages."""
    from worker.compression.pipeline import Reporter, run_job

    marks: dict[str, float] = {}

    def progress(fraction: float, stage: str) -> None:
        now = time.perf_counter()
        if fraction >= 0.1 and "stages" not in marks:
            marks["stages"] = now
        if stage == "saving artifact":
            marks["saving"] = now

    started = time.perf_counter()
    result = run_job(request, Reporter(progress=progress))
    ended = time.perf_counter()
    result["wall_s"] = round(ended - started, 4)
    result["compress_s"] = round(marks.get("saving", ended) - marks.get("stages", started), 4)
    return result


def load_artifact_module(path: Path, artifact_format: str, architecture: dict[str, Any]) -> Any:
    """The artifact as a user runs it: TorchScript / exported program loaded, state_dicts put into the architecture."""
    import torch

    from worker.compression.registry import build_architecture

    if artifact_format == "torchscript":
        return torch.jit.load(str(path)).eval()
    if artifact_format == "exported_program":
        return torch.export.load(str(path)).module()
    if artifact_format == "deep_compression":  # the container decodes to a state_dict with NumPy, as the README shows
        from modelpress.deep_compression_format import load_state_dict

        state = load_state_dict(path)
    else:
        from worker.compression.sparse_format import decode_sparse_state_dict

        state = decode_sparse_state_dict(torch.load(str(path), weights_only=True))
    module = build_architecture(architecture["name"], architecture.get("kwargs") or {})
    module.load_state_dict(state)
    return module.eval()


# ---------------------------------------------------------------------------- measurement


def latency_ms(
    model: Callable[[Any], Any], example: Any, budget_s: float, min_iterations: int = 10, max_iterations: int = 5000
) -> float:
    """Median wall time of one call, after a warm-up, within a time budget."""
    import torch

    timings: list[float] = []
    with torch.inference_mode():
        for _ in range(3):
            model(example)
        started = time.perf_counter()
        while len(timings) < max_iterations and (
            len(timings) < min_iterations or time.perf_counter() - started < budget_s
        ):
            t0 = time.perf_counter()
            model(example)
            timings.append(time.perf_counter() - t0)
    return statistics.median(timings) * 1e3


def paired_latency(
    baseline: Callable[[Any], Any],
    candidate: Callable[[Any], Any],
    examples: dict[int, Any],
    budget_s: float,
    rounds: int,
) -> dict[int, dict[str, float]]:
    """Baseline and candidate timed in alternation, `rounds` times per batch size; medians and their ratio."""
    figures: dict[int, dict[str, float]] = {}
    for batch, example in examples.items():
        base, cand = [], []
        for _ in range(max(1, rounds)):
            base.append(latency_ms(baseline, example, budget_s))
            cand.append(latency_ms(candidate, example, budget_s))
        b, c = statistics.median(base), statistics.median(cand)
        figures[batch] = {"baseline_ms": round(b, 4), "ms": round(c, 4), "speedup": round(b / c, 3) if c else None}
    return figures


def predict(model: Callable[[Any], Any], inputs: Any) -> Any:
    import torch

    outs = []
    with torch.inference_mode():
        for start in range(0, len(inputs), 256):
            out = model(inputs[start : start + 256])
            outs.append((out if isinstance(out, torch.Tensor) else out[0]).float())
    return torch.cat(outs)


def sqnr_db(reference: Any, output: Any) -> float | None:
    noise = float((reference.float() - output.float()).pow(2).mean())
    signal = float(reference.float().pow(2).mean())
    return None if noise == 0 else round(10 * math.log10(signal / noise), 2)


def top1(outputs: Any, labels: Any) -> float:
    return round(float((outputs.argmax(1) == labels).float().mean()), 4)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 1]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def serialized_bytes(obj: Any) -> int:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer().nbytes


# ---------------------------------------------------------------------------- environment and results


def environment() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": THREADS,
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
    }
    for package, module in (("torchao", "torchao"), ("torch-pruning", "torch_pruning"), ("scikit-learn", "sklearn")):
        info[package] = _version(package, module)
    try:
        info["git_commit"] = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def _version(package: str, module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_results(path: Path = RESULTS_PATH) -> dict[str, Any]:
    if path.exists():
        try:
            data = json.loads(path.read_text())
            if isinstance(data, dict) and isinstance(data.get("sections"), dict):
                return data
        except (OSError, json.JSONDecodeError):
            pass
    return {"sections": {}}


def save_results(results: dict[str, Any], path: Path = RESULTS_PATH) -> None:
    path.write_text(json.dumps(results, indent=1, default=_json_default, allow_nan=False) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return str(value)


def finite(value: Any) -> Any:
    """NaN and infinities become None, so the JSON stays strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def command_for(section: str, size: str) -> str:
    return f".venv/bin/python -m bench.run --only {section} --size {size}"


def fmt(value: Any, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def record_section(key: str, section: dict[str, Any]) -> None:
    """Merge one stand-alone benchmark's section into bench/results.json and rewrite BENCHMARKS.md.

    For scripts outside `bench.run` (bench.sensitivity, bench.cnn_repair): their sections are kept
    by later `make bench` runs like any section not run.
    """
    from bench import report

    results = load_results()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    results["sections"][key] = finite({**section, "generated_at": stamp})
    save_results(results)
    MARKDOWN_PATH.write_text(report.render(results))
