"""Issue 15's matrix at the engine level: every zoo model in every upload form (TorchScript, exported program,
native checkpoint) against every main scheme, through the worker's own upload trials
(worker.upload_trials.try_schemes: sandboxed children, a native crash contained to its scheme). Each cell
runs, or fails with the sentence the API then answers 422 with at submit; the cells the issue names run.

Two uploads are tried at a time (each trial child uses one thread), so the matrix costs about half its
CPU time on the suite's two cores.
"""

from __future__ import annotations

import math
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from bench import model_zoo as zoo
from bench.zoo_matrix import declared_call, save_upload, upload_forms
from worker.compression.inspect import inspect_model
from worker.compression.trial_plan import ALL_TRIALS

pytestmark = pytest.mark.slow

MODELS = [name for name in zoo.NAMES if name != "tiny_mlp"]
# torchvision's full-size ResNet-18 (11.7 M parameters) as a state_dict is left to the benchmark's matrix
# (`make bench`, BENCHMARKS section 9), which runs every form: here it would cost a minute of the suite
UPLOADS = [(name, form) for name in MODELS for form in upload_forms(name) if (name, form) != ("resnet", "native")]
# the cells refused today, each with the words its sentence must hold; every other cell must run. torch's
# TorchScript -> exported program converter cannot translate nn.MultiheadAttention's traced head split
# (a view whose size is computed from tensor values), which static int8 and structured pruning need
KNOWN_REFUSALS: dict[tuple[str, str, str], str] = {
    ("vit", "torchscript", "quantize:static_int8"): "could not be converted to an exported program",
    ("vit", "torchscript", "prune:ln_structured"): "could not be converted to an exported program",
}


def _prepare_upload(name: str, form: str, scratch: Path) -> dict[str, Any]:
    """The upload file and what the worker knows of it before the trials: its inspection (in this process:
    torch.export is not thread-safe, so this part runs one upload at a time)."""
    folder = scratch / f"{name}-{form}"
    folder.mkdir()
    entry = zoo.build(name)
    path, fmt, architecture, _ = save_upload(entry, folder, form)
    declared, constants = (None, None) if fmt == "huggingface" else declared_call(entry)
    inspection = inspect_model(path, fmt, architecture, declared)
    reference = {"path": path, "format": fmt, "architecture": architecture}
    return {
        "id": f"{name}-{form}",
        "reference": reference,
        "inputs": declared,
        "constants": constants or None,
        "inspection": inspection,
    }


def _try_upload(upload: dict[str, Any]) -> dict[str, Any]:
    from worker.upload_trials import try_schemes

    reference = upload["reference"]

    def fetch(child_folder: Path) -> dict[str, Any]:
        copy = child_folder / reference["path"].name
        shutil.copyfile(reference["path"], copy)
        return dict(reference, path=str(copy))

    return try_schemes(
        upload["id"], fetch, upload["inputs"], upload["inspection"], "none", forward_kwargs=upload["constants"]
    )


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict[str, Any]]:
    import os

    from app.config import get_settings

    scratch = tmp_path_factory.mktemp("zoo-matrix")
    previous = {key: os.environ.get(key) for key in ("MODELPRESS_DATA_DIR", "MODELPRESS_WARM_SANDBOX")}
    os.environ.update(MODELPRESS_DATA_DIR=str(scratch / "data"), MODELPRESS_WARM_SANDBOX="false")
    get_settings.cache_clear()
    uploads = UPLOADS
    try:
        prepared = [_prepare_upload(name, form, scratch) for name, form in uploads]
        # the trials run in child processes: two at a time keep both cores busy
        with ThreadPoolExecutor(max_workers=2) as pool:
            found = dict(zip(uploads, pool.map(_try_upload, prepared)))
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        get_settings.cache_clear()
    return found


def test_every_cell_runs_or_is_refused_with_a_sentence(matrix: dict[tuple[str, str], dict[str, Any]]) -> None:
    lines = []
    for (name, form), trials in sorted(matrix.items()):
        assert set(trials["results"]) == set(ALL_TRIALS), (name, form, trials)
        for key, result in trials["results"].items():
            if not result["ok"]:
                reason = result["reason"]
                # a sentence a user can act on: more than an exception's name, not a bare interpreter frame
                assert len(reason) > 40 and "failed in the TorchScript interpreter." not in reason[:60], (
                    name,
                    form,
                    key,
                    reason,
                )
            lines.append(f"{name:13s} {form:17s} {key:22s} {'ok' if result['ok'] else result['reason'][:90]}")
    print("\n".join(lines))


def test_every_cell_but_the_known_refusals_runs(matrix: dict[tuple[str, str], dict[str, Any]]) -> None:
    outcomes = {
        (name, form, key): result
        for (name, form), trials in matrix.items()
        for key, result in trials["results"].items()
    }
    refused = {cell: result["reason"] for cell, result in outcomes.items() if not result["ok"]}
    assert set(refused) == set(KNOWN_REFUSALS), refused
    for cell, words in KNOWN_REFUSALS.items():
        assert words in refused[cell], (cell, refused[cell])
    # what ran was measured against the float model, as the job will report it
    for cell, result in outcomes.items():
        if result["ok"]:
            assert isinstance(result["sqnr_db"], float) and not math.isnan(result["sqnr_db"]), (cell, result)
            assert result["size_ratio"] > 0, (cell, result)
