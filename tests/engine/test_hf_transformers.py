"""The real transformers BERT and GPT-2 of the zoo through static_int8 and fp16, in each upload format.

A Hugging Face upload (a zipped save_pretrained folder) is an eager model torch.fx cannot trace,
so static_int8 quantizes its torch.export graph; fp16 exports the half-precision model with the
sequence dynamic. Each case checks the artifact the way the README loads it, against the float
model on the job's own fidelity inputs (its calibration set): SQNR and size as the job reported.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests import zoo
from worker.compression.inputs import ModelInputs, Signature, make_example
from worker.compression.io import save_artifact
from worker.compression.pipeline import JobRequest, ModelRef, StageSpec, run_job

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLES = 32
MIN_SQNR_DB = 25.0
SQNR_TOLERANCE_DB = 0.5


def _upload(entry: zoo.ZooEntry, model_format: str, folder: Path) -> Path:
    return entry.save_as(model_format, folder)


def _inputs(entry: zoo.ZooEntry, fmt: str) -> list[dict[str, Any]]:
    """The forward call: from config.json for a save_pretrained upload (as the engine reads it), else
    the zoo's example inputs with the batch dynamic (its .pt2 export fixed the sequence)."""
    if fmt == "huggingface":
        from worker.compression.huggingface import declared_inputs

        declared = declared_inputs(entry.model)
        assert declared is not None
        return declared
    names = ["input_ids", "attention_mask"][: len(entry.inputs)]
    return [
        {
            "name": name,
            "shape": [1, tensor.shape[1]],
            "dtype": "int64",
            "low": 1 if name == "attention_mask" else 0,
            "high": 2 if name == "attention_mask" else zoo.VOCAB,
            "dynamic": [0],
        }
        for name, tensor in zip(names, entry.inputs)
    ]


def _floating_outputs(output: Any) -> dict[str, torch.Tensor]:
    """The floating tensors of a tensor / tuple / dict / ModelOutput, by name."""
    if isinstance(output, torch.Tensor):
        return {"output": output} if output.is_floating_point() else {}
    items = output.items() if hasattr(output, "items") else enumerate(output)
    return {str(k): v for k, v in items if isinstance(v, torch.Tensor) and v.is_floating_point()}


def _sqnr_db(reference: Any, output: Any) -> float:
    """Total signal over total noise across the outputs both sides name (the first one else), as a job scores it."""
    ref, out = _floating_outputs(reference), _floating_outputs(output)
    names = list(ref) if set(ref) == set(out) else [next(iter(ref))]
    pairs = [(ref[n], out[n] if n in out else next(iter(out.values()))) for n in names]
    signal = sum(float(r.float().pow(2).sum()) for r, _ in pairs)
    noise = sum(float((r.float() - o.float()).pow(2).sum()) for r, o in pairs)
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


# the save_pretrained uploads of both models with both schemes; then each other format once per scheme,
# on the model whose path differs there (all 12 pass; these 8 keep the file at about two minutes)
CASES = [
    *[(name, "huggingface", scheme) for name in ("bert", "gpt2") for scheme in ("static_int8", "fp16")],
    ("bert", "exported_program", "static_int8"),  # a ModelOutput-returning graph, lifted
    ("gpt2", "exported_program", "fp16"),  # the graph's float32 casts retargeted
    ("gpt2", "torchscript", "static_int8"),  # through torch's TorchScript converter
    ("bert", "torchscript", "fp16"),  # several inputs: through an exported program
]


@pytest.mark.parametrize(("name", "fmt", "scheme"), CASES)
def test_transformers_model_compresses_in_every_format(name: str, fmt: str, scheme: str, tmp_path: Path) -> None:
    entry = zoo.build(name)
    upload = _upload(entry, fmt, tmp_path)
    inputs = _inputs(entry, fmt)
    signature = Signature.from_request(inputs, None)
    assert signature is not None
    calibration = make_example(signature, batch=SAMPLES, seed=1)
    assert isinstance(calibration, ModelInputs)  # token ids: never the one-float-tensor shorthand
    dataset = tmp_path / "calibration.npz"
    np.savez(dataset, **{n: t.numpy() for n, t in zip(calibration.names, calibration.tensors)})

    result = run_job(
        JobRequest(
            model=ModelRef(str(upload), fmt),
            stages=[StageSpec("quantize", scheme, {})],
            artifact_path=str(tmp_path / "artifact"),
            inputs=None if fmt == "huggingface" else inputs,  # a save_pretrained folder declares its own
            dataset_path=str(dataset),
            seed=0,
        )
    )
    metrics = result["metrics"]
    artifact = tmp_path / "artifact"

    # loaded as the README says
    expected_format = "torchscript" if scheme == "static_int8" else "exported_program"
    assert result["artifact_format"] == expected_format
    if expected_format == "torchscript":
        loaded = torch.jit.load(str(artifact))
    else:
        loaded = torch.export.load(str(artifact)).module()
    with torch.no_grad():
        reference = entry.model(*calibration.tensors)
        output = loaded(*calibration.tensors)
    sqnr = _sqnr_db(reference, output)
    assert sqnr >= MIN_SQNR_DB, f"{name} {fmt} {scheme}: {sqnr:.1f} dB"
    assert abs(sqnr - metrics["fidelity"]["sqnr_db"]) <= SQNR_TOLERANCE_DB

    # the reported ratio is the files' own, and the artifact is smaller than the float model in its format
    # (these tiny models' weights are outweighed by a format's fixed overhead, so not by the upload)
    assert metrics["compression_ratio"] == pytest.approx(upload.stat().st_size / artifact.stat().st_size, rel=1e-3)
    float_file = tmp_path / "float"
    save_artifact(entry.model, "eager", expected_format, float_file, make_example(signature, seed=0), signature)
    assert artifact.stat().st_size < float_file.stat().st_size


def test_exported_transformers_program_loads_without_importing_transformers_first(tmp_path: Path) -> None:
    """A .pt2 of a BERT returns a ModelOutput: the loader imports transformers' output classes that
    the program's specs name (read from its JSON), which torch.export.load needs registered."""
    path = zoo.build("bert").save_exported(tmp_path / "bert.pt2")
    from worker.compression.archive_check import spec_types

    assert "transformers.modeling_outputs.BaseModelOutputWithPoolingAndCrossAttentions" in spec_types(path)
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from worker.compression.io import load_model\n"
        "assert 'transformers' not in sys.modules\n"
        f"model, kind = load_model(Path({str(path)!r}), 'exported_program', None)\n"
        "print(kind, type(model).__name__)\n"
    )
    root = Path(__file__).resolve().parents[2]
    child = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=False, timeout=300
    )
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.split()[0] == "graph"
