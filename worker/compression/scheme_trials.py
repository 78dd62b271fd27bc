"""Each main scheme tried on an upload, so that what would fail in the worker is refused at submit.

Inspection knows a model's format and graph, but whether torch.fx traces it, whether the TorchScript
converter takes it, whether structured pruning finds channels to remove or fp16 keeps its dtypes
consistent is only known by trying. So after inspection, each scheme of TRIAL_STAGES runs once on the
upload as a real (small) job: a few seeded samples of the declared inputs as calibration data, one
thread, a short latency budget. The API then refuses at submit, with the trial's own sentence, a first
stage whose scheme failed here (app/jobs.py, modelpress.catalog.validate).

A trial can crash the process natively (some int8 kernels on recurrent graphs do): results are written
to TRIALS_FILE as each trial ends, with the one in progress named first, so the supervisor
(worker.runner) records the crash against that scheme and starts a new child for the rest.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.compression.base import EngineError
from worker.compression.trial_plan import ALL_TRIALS, TRIAL_STAGES, short_reason, trial_key, write_progress

TRIAL_SAMPLES = 8
# enough calls to catch an artifact that does not run, not to measure anything
TRIAL_LATENCY_BUDGET_S = 0.05


@dataclass(frozen=True)
class TrialRequest:
    """An upload as the trials see it: its file, format, architecture and the inputs its forward takes."""

    path: str
    format: str
    architecture: dict[str, Any] | None
    inputs: list[dict[str, Any]]
    schemes: tuple[str, ...] = ALL_TRIALS
    # constant non-tensor arguments of forward, declared with the upload
    forward_kwargs: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialRequest:
        return cls(
            data["path"],
            data["format"],
            data.get("architecture"),
            data["inputs"],
            tuple(data["schemes"]),
            data.get("forward_kwargs"),
        )


def run_trials(request: TrialRequest, scratch: Path) -> dict[str, dict[str, Any]]:
    """Try each scheme of the request in turn; returns {"method:scheme": {"ok", "reason" | figures, "seconds"}}."""
    from worker.compression import breadcrumbs

    results: dict[str, dict[str, Any]] = {}
    calibration = _calibration(request.inputs, request.forward_kwargs, scratch)
    if (problem := _does_not_run(request, calibration)) is not None:
        # every trial would fail the same way, which says nothing about the schemes: nothing is refused
        write_progress(scratch, {}, trying=None, skipped=problem)
        return {}
    for method, scheme, options in TRIAL_STAGES:
        key = trial_key(method, scheme)
        if key not in request.schemes:
            continue
        write_progress(scratch, results, trying=key)
        breadcrumbs.stage(f"trying {key} on the upload")
        results[key] = try_scheme(request, method, scheme, options, calibration, scratch)
    write_progress(scratch, results, trying=None)
    return results


def try_scheme(
    request: TrialRequest, method: str, scheme: str, options: dict[str, Any], calibration: Path, scratch: Path
) -> dict[str, Any]:
    """One small job of `scheme` on the upload: its figures when it ran, else the sentence it failed with."""
    from worker.compression.pipeline import JobRequest, ModelRef, StageSpec, run_job

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=scratch) as folder:
        job = JobRequest(
            model=ModelRef(request.path, request.format, request.architecture),
            stages=[StageSpec(method, scheme, dict(options)).to_config()],
            artifact_path=str(Path(folder) / "artifact"),
            inputs=request.inputs,
            forward_kwargs=request.forward_kwargs,
            dataset_path=str(calibration),
            threads=1,
            latency_budget_s=TRIAL_LATENCY_BUDGET_S,
        )
        try:
            metrics = run_job(job)["metrics"]
        except EngineError as error:
            return _failed(str(error), started)
        except Exception as error:  # what the job would have failed with, named as the job would name it
            return _failed(f"{type(error).__name__}: {error}", started)
    return {
        "ok": True,
        "size_ratio": metrics.get("compression_ratio"),
        "sqnr_db": (metrics.get("fidelity") or {}).get("sqnr_db"),
        "seconds": round(time.perf_counter() - started, 2),
    }


def _failed(reason: str, started: float) -> dict[str, Any]:
    return {"ok": False, "reason": short_reason(reason), "seconds": round(time.perf_counter() - started, 2)}


def _does_not_run(request: TrialRequest, calibration: Path) -> str | None:
    """Why the upload does not run on the trial inputs (a constant argument it needs was not declared with
    it, say), or None when it runs."""
    from worker.compression.inputs import Signature, call_model
    from worker.compression.io import load_dataset, load_model

    model, _ = load_model(Path(request.path), request.format, request.architecture)
    data = load_dataset(calibration, Signature.from_request(request.inputs, None, request.forward_kwargs))
    try:
        with torch.inference_mode():
            call_model(model, data.inputs[:2])
    except Exception as error:
        return short_reason(f"{type(error).__name__}: {error}")
    return None


def _calibration(inputs: list[dict[str, Any]], constants: dict[str, Any] | None, scratch: Path) -> Path:
    """TRIAL_SAMPLES seeded samples of the declared inputs, as a dataset of named arrays."""
    from worker.compression.inputs import ModelInputs, Signature, make_example

    signature = Signature.from_request(inputs, None, constants)
    assert signature is not None
    example = make_example(signature, batch=TRIAL_SAMPLES, seed=1)
    tensors = example.tensors if isinstance(example, ModelInputs) else (example,)
    names = ["inputs"] if len(inputs) == 1 else [spec["name"] for spec in inputs]
    path = scratch / "trial-calibration.npz"
    arrays: dict[str, Any] = {name: _array(tensor) for name, tensor in zip(names, tensors)}
    np.savez(path, **arrays)
    return path


def _array(tensor: torch.Tensor) -> Any:
    # numpy has no bfloat16: such inputs are stored as float32 and cast back to the declared dtype on load
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
