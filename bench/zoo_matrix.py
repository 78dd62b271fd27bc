"""The model zoo against the main CPU schemes (`python -m bench.run --only zoo`).

Every model of `tests/zoo.py` (tiny seeded random-init configs) goes up in one upload format
(an exported program; TorchScript for the model with an int argument, whose constant an
export would bake in; a zipped `save_pretrained` folder for the Hugging Face models, whose
inputs then come from config.json) and through each scheme as one engine job
(`worker.compression.pipeline.run_job`, one thread). A cell is the job's own report: size
ratio, speedup of the p50 latency, SQNR over every output; or the sentence it was refused with.
Each model runs in a child process (`python -m bench.zoo_matrix MODEL SCHEME...`): a native crash
is recorded as the cell's outcome and the remaining schemes run in a fresh child.
"""

from __future__ import annotations

import inspect
import json
import signal
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

SCHEMES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("quantize", "dynamic_int8", {}),
    ("quantize", "static_int8", {}),
    ("quantize", "fp16", {}),
    ("prune", "ln_structured", {"amount": 0.3}),
    ("prune", "l1_unstructured", {"amount": 0.5}),
)
HUGGING_FACE = ("bert", "gpt2")
CALIBRATION_SAMPLES = 32


def _declared_inputs(entry: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The entry's forward call as a job declares it: named inputs (batch dynamic) and constants."""
    from bench import model_zoo as zoo

    names = [n for n in inspect.signature(entry.model.forward).parameters]
    inputs = []
    for name, tensor in zip(names, entry.inputs):
        spec: dict[str, Any] = {"name": name, "shape": [1, *tensor.shape[1:]], "dynamic": [0]}
        if tensor.is_floating_point():
            spec["dtype"] = "float32"
        else:
            spec.update(dtype="int64", low=1 if "mask" in name else 0, high=2 if "mask" in name else zoo.VOCAB)
        inputs.append(spec)
    constants = dict(zip(names[len(entry.inputs) :], entry.constants))
    return inputs, constants


def _upload(entry: Any, folder: Path) -> tuple[Path, str]:
    if entry.name in HUGGING_FACE:
        saved = folder / f"{entry.name}-saved"
        entry.model.save_pretrained(str(saved))
        archive = folder / f"{entry.name}.zip"
        with zipfile.ZipFile(archive, "w") as handle:
            for file in sorted(saved.iterdir()):
                handle.write(file, f"{entry.name}/{file.name}")
        return archive, "huggingface"
    if entry.constants:
        return entry.save_torchscript(folder / f"{entry.name}.pt"), "torchscript"
    return entry.save_exported(folder / f"{entry.name}.pt2"), "exported_program"


def _calibration(entry: Any, inputs: list[dict[str, Any]], constants: dict[str, Any], folder: Path) -> Path:
    """CALIBRATION_SAMPLES seeded random samples of the declared inputs, as a dataset of named arrays."""
    import numpy as np

    from worker.compression.inputs import ModelInputs, Signature, make_example

    signature = Signature.from_request(inputs, None, constants or None)
    assert signature is not None
    example = make_example(signature, batch=CALIBRATION_SAMPLES, seed=1)
    tensors = example.tensors if isinstance(example, ModelInputs) else [example]
    path = folder / "calibration.npz"
    # one input is the dataset's `inputs` array; several are named like the inputs
    names = ["inputs"] if len(inputs) == 1 else [spec["name"] for spec in inputs]
    np.savez(path, **{name: tensor.numpy() for name, tensor in zip(names, tensors)})
    return path


def _cell(method: str, scheme: str, options: dict[str, Any], path: Path, fmt: str, entry: Any) -> dict[str, Any]:
    from worker.compression.huggingface import declared_inputs
    from worker.compression.pipeline import JobRequest, ModelRef, StageSpec, run_job

    inputs, constants = _declared_inputs(entry)
    if fmt == "huggingface":  # the job declares none: the engine reads them from config.json, as here
        inputs = declared_inputs(entry.model) or inputs
    request = JobRequest(
        model=ModelRef(str(path), fmt),
        stages=[StageSpec(method, scheme, dict(options))],
        artifact_path=str(path.parent / f"{entry.name}-{scheme}.out"),
        inputs=None if fmt == "huggingface" else inputs,
        forward_kwargs=constants or None,
        dataset_path=str(_calibration(entry, inputs, constants, path.parent)),
        threads=1,
    )
    try:
        metrics = run_job(request)["metrics"]
    except Exception as error:  # the matrix records refusals and failures, the sentence included
        return {"outcome": "refused", "reason": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
    return {
        "outcome": "ok",
        "size_ratio": metrics.get("compression_ratio"),
        "speedup": metrics.get("speedup"),
        "sqnr_db": (metrics.get("fidelity") or {}).get("sqnr_db"),
        "warnings": len(metrics.get("warnings") or []),
    }


def _show(cell: dict[str, Any]) -> str:
    if cell["outcome"] != "ok":
        return "refused"
    sqnr = cell["sqnr_db"]
    sqnr_text = "∞" if sqnr is None or sqnr == float("inf") else f"{sqnr:.0f} dB"
    return f"{cell['size_ratio']:.2f}× · {cell['speedup']:.2f}× · {sqnr_text}"


def _run_model(name: str, schemes: list[str], scratch: Path) -> tuple[str, dict[str, dict[str, Any]]]:
    """Cells of one model, each scheme in a child process; a crash costs only the scheme it hit."""
    cells: dict[str, dict[str, Any]] = {}
    fmt = "?"
    remaining = list(schemes)
    while remaining:
        child = subprocess.run(
            [sys.executable, "-m", "bench.zoo_matrix", name, str(scratch), *remaining],
            capture_output=True,
            text=True,
            check=False,
        )
        for line in child.stdout.splitlines():
            if line.startswith("{"):
                message = json.loads(line)
                fmt = message["format"]
                cells[message["scheme"]] = message["cell"]
        remaining = [s for s in schemes if s not in cells]
        if remaining and child.returncode != 0:
            code = child.returncode
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            last = (child.stderr.strip().splitlines() or ["no output"])[-1][:160]
            cells[remaining.pop(0)] = {"outcome": "crashed", "reason": f"the process crashed ({how}): {last}"}
        elif remaining:
            break
    return fmt, cells


def _show_cell(cell: dict[str, Any]) -> str:
    return cell["outcome"] if cell["outcome"] != "ok" else _show(cell)


def run(size: Any, assets: Any) -> dict[str, Any]:
    from bench import model_zoo as zoo

    # tiny (the smoke test): the Hugging Face path alone
    names = [n for n in zoo.NAMES if n != "tiny_mlp"] if size.name != "tiny" else ["bert"]
    schemes = [scheme for _, scheme, _ in SCHEMES]
    matrix: dict[str, dict[str, Any]] = {}
    formats: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            formats[name], matrix[name] = _run_model(name, schemes, Path(scratch))
    refusals = [
        f"{name} × {scheme}: {cell['outcome']}: {cell['reason']}"
        for name, row in matrix.items()
        for scheme, cell in row.items()
        if cell["outcome"] != "ok"
    ]
    return {
        "title": "9. The model zoo against the main schemes",
        "intro": (
            "Each zoo model (tests/zoo.py: tiny seeded random-init torchvision / timm / Hugging Face look-alikes "
            "and the real transformers BERT and GPT-2) as one upload, through each scheme as one engine job at one "
            "thread. A cell: size ratio (original / artifact) · speedup (p50 latency, original / compressed) · SQNR "
            "over every output, all as the job reported them; `refused` / `crashed` name their reason below. Each "
            "job gets 32 seeded random samples of its inputs as calibration data. Random weights: SQNR and speed, "
            "not accuracy."
        ),
        "command": "python -m bench.run --only zoo",
        "matrix": matrix,
        "formats": formats,
        "tables": [
            {
                "title": "Model × scheme",
                "columns": ["model (upload)", *schemes],
                "rows": [
                    [
                        f"{name} ({formats[name]})",
                        *(_show_cell(matrix[name].get(s, {"outcome": "not run"})) for s in schemes),
                    ]
                    for name in matrix
                ],
            }
        ],
        "notes": refusals,
    }


def _child(name: str, scratch: str, schemes: list[str]) -> None:
    """One model's cells, one JSON line each as it finishes (the parent survives a crash)."""
    import warnings

    from bench import model_zoo as zoo
    from worker.compression.torchvision_ops import declare_torchvision_ops

    warnings.simplefilter("ignore")
    declare_torchvision_ops()  # transformers imports torchvision when it is installed
    torch.set_num_threads(1)
    entry = zoo.build(name)
    folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=scratch))
    path, fmt = _upload(entry, folder)
    for method, scheme, options in SCHEMES:
        if scheme in schemes:
            cell = _cell(method, scheme, options, path, fmt, entry)
            print(json.dumps({"scheme": scheme, "format": fmt, "cell": cell}, default=str), flush=True)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], sys.argv[3:])
