"""The model zoo against the main CPU schemes (`python -m bench.run --only zoo`).

Every model of `bench/model_zoo.py` (tiny seeded random-init configs) goes up in each upload form:
TorchScript, an exported program (not for the model with an int argument, whose constant an export would
bake in) and the native checkpoint where there is one (a zipped `save_pretrained` folder for the Hugging
Face models, whose inputs then come from config.json; the torchvision / timm class by name with a
state_dict for the look-alikes). Each scheme is first tried on the upload as the worker does after
inspection (worker/upload_trials.py): a failed trial is the 422 the API answers at submit. Otherwise the
job runs as one engine job (`worker.compression.pipeline.run_job`, one thread) and the cell is its own
report: size ratio, speedup of the p50 latency, SQNR over every output; or the sentence it failed with.
Each upload runs in a child process (`python -m bench.zoo_matrix MODEL FORM SCRATCH SCHEME...`): a native
crash is recorded against the scheme it hit and the remaining schemes run in a fresh child.
"""

from __future__ import annotations

import inspect
import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from worker.compression.trial_plan import TRIAL_STAGES

# the schemes the worker tries on each upload, with the same options
SCHEMES = TRIAL_STAGES
HUGGING_FACE = ("bert", "gpt2")
OUTCOMES = ("ok", "refused", "failed", "crashed")
CALIBRATION_SAMPLES = 32


def declared_call(entry: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
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


# The native checkpoint form of the look-alikes: the libraries' own classes, built by name the way an
# upload names them (tiny configs where the constructor takes them), as a state_dict
LIBRARY_FORMS: dict[str, dict[str, Any]] = {
    "resnet": {"name": "torchvision.resnet18", "kwargs": {"num_classes": 10}},
    "mobilenet_v3": {"name": "torchvision.mobilenet_v3_small", "kwargs": {"num_classes": 10}},
    "vit": {
        "name": "timm.vit_tiny_patch16_224",
        "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "num_classes": 10},
    },
}
# "native": how the ecosystem saves the model (a Hugging Face folder; a torchvision / timm state_dict)
FORMATS = ("torchscript", "exported_program", "native")


def upload_forms(name: str) -> list[str]:
    """The upload forms of one zoo model: TorchScript and .pt2 always, the native one where there is one.
    An export bakes a constant argument in, so the model with an int argument goes up as TorchScript only."""
    from bench import model_zoo as zoo

    entry_has_constants = name == "audio"
    forms = ["torchscript"] if entry_has_constants else ["torchscript", "exported_program"]
    if name in HUGGING_FACE or name in LIBRARY_FORMS:
        forms.append("native")
    assert name in zoo.NAMES
    return forms


def save_upload(entry: Any, folder: Path, form: str) -> tuple[Path, str, dict[str, Any] | None, Any]:
    """The upload file, its format, its architecture and the model it holds (the entry's, or the library's)."""
    if form == "torchscript":
        return entry.save_torchscript(folder / f"{entry.name}.pt"), "torchscript", None, entry.model
    if form == "exported_program":
        return entry.save_exported(folder / f"{entry.name}.pt2"), "exported_program", None, entry.model
    if entry.name in HUGGING_FACE:
        return entry.save_pretrained_zip(folder), "huggingface", None, entry.model
    from worker.compression.registry import build_architecture

    architecture = LIBRARY_FORMS[entry.name]
    torch.manual_seed(0)
    model = build_architecture(architecture["name"], architecture["kwargs"])
    # batch-norm statistics as training leaves them: at their initial values (mean 0, variance 1) a
    # random-init MobileNetV3's activations shrink to 1e-10 and every SQNR reads 0 dB
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, 3, 32, 32))
    model.eval()
    path = folder / f"{entry.name}-state.pt"
    torch.save(model.state_dict(), path)
    return path, "state_dict", architecture, model


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


def _cell(
    method: str, scheme: str, options: dict[str, Any], upload: tuple[Path, str, Any, Any], entry: Any
) -> dict[str, Any]:
    """The job a user would submit (declared inputs, constants, a calibration dataset), measured in full."""
    from worker.compression.huggingface import declared_inputs
    from worker.compression.pipeline import JobRequest, ModelRef, StageSpec, run_job

    path, fmt, architecture, model = upload
    inputs, constants = declared_call(entry)
    if fmt == "huggingface":  # the job declares none: the engine reads them from config.json, as here
        inputs = declared_inputs(model) or inputs
    request = JobRequest(
        model=ModelRef(str(path), fmt, architecture),
        stages=[StageSpec(method, scheme, dict(options)).to_config()],
        artifact_path=str(path.parent / f"{entry.name}-{scheme}.out"),
        inputs=None if fmt == "huggingface" else inputs,
        forward_kwargs=constants or None,
        dataset_path=str(_calibration(entry, inputs, constants, path.parent)),
        threads=1,
    )
    try:
        metrics = run_job(request)["metrics"]
    except Exception as error:  # accepted at submit, failed in the worker: the sentence it failed with
        return {"outcome": "failed", "reason": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
    return {
        "outcome": "ok",
        "size_ratio": metrics.get("compression_ratio"),
        "speedup": metrics.get("speedup"),
        "speed_verdict": metrics.get("speed_verdict"),
        "sqnr_db": (metrics.get("fidelity") or {}).get("sqnr_db"),
        "warnings": len(metrics.get("warnings") or []),
    }


def _trial(key: str, upload: tuple[Path, str, Any, Any], entry: Any, folder: Path) -> dict[str, Any] | None:
    """The upload trial the worker runs after inspection (worker.upload_trials) for one scheme, in this
    process, with the inputs and constants declared at upload: None when the worker would skip the trials
    (inputs unknown), so nothing is refused at submit."""
    from worker.compression.inspect import inspect_model
    from worker.compression.scheme_trials import TrialRequest, run_trials
    from worker.compression.trial_plan import read_progress, trial_inputs

    path, fmt, architecture, _ = upload
    declared, constants = (None, None) if fmt == "huggingface" else declared_call(entry)
    inputs = trial_inputs(declared, inspect_model(path, fmt, architecture, declared))
    if inputs is None:
        return None
    trial_folder = folder / f"trial-{key.replace(':', '-')}"
    trial_folder.mkdir(exist_ok=True)
    request = TrialRequest(str(path), fmt, architecture, inputs, (key,), constants or None)
    results = run_trials(request, trial_folder)
    return None if read_progress(trial_folder)[2] else results[key]


def _show(cell: dict[str, Any]) -> str:
    if cell["outcome"] != "ok":
        return str(cell["outcome"])
    sqnr = cell["sqnr_db"]
    sqnr_text = "∞" if sqnr is None or sqnr == float("inf") else f"{sqnr:.0f} dB"
    speed = f"{cell['speedup']:.2f}×" if cell.get("speed_verdict") != "no measurable change" else "no change"
    return f"{cell['size_ratio']:.2f}× · {speed} · {sqnr_text}"


def _run_upload(name: str, form: str, schemes: list[str], scratch: Path) -> tuple[str, dict[str, dict[str, Any]]]:
    """Cells of one upload, in a child process; a native crash costs only the scheme it hit, whose trial
    (crashed before it said anything) is then what the service refuses at submit."""
    cells: dict[str, dict[str, Any]] = {}
    fmt = "?"
    remaining = list(schemes)
    while remaining:
        child = subprocess.run(
            [sys.executable, "-m", "bench.zoo_matrix", name, form, str(scratch), *remaining],
            capture_output=True,
            text=True,
            check=False,
        )
        trying: tuple[str, str] | None = None
        for line in child.stdout.splitlines():
            if line.startswith("{"):
                message = json.loads(line)
                fmt = message["format"]
                if "cell" in message:
                    cells[message["scheme"]] = message["cell"]
                    trying = None
                else:
                    trying = (message["scheme"], message["phase"])
        remaining = [s for s in schemes if s not in cells]
        if remaining and child.returncode != 0:
            code = child.returncode
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            last = (child.stderr.strip().splitlines() or ["no output"])[-1][:160]
            scheme, phase = trying or (remaining[0], "job")
            outcome = "refused" if phase == "trial" else "crashed"
            cells[scheme] = {"outcome": outcome, "reason": f"the process crashed in the {phase} ({how}): {last}"}
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
    uploads: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            for form in upload_forms(name) if size.name != "tiny" else ["native"]:
                fmt, cells = _run_upload(name, form, schemes, Path(scratch))
                label = f"{name} ({fmt})"
                matrix[label], uploads[label] = cells, {"model": name, "form": form, "format": fmt}
    notes = [
        f"{label} × {scheme}: {cell['outcome']}: {cell['reason']}"
        for label, row in matrix.items()
        for scheme, cell in row.items()
        if cell["outcome"] != "ok"
    ]
    counts = {o: sum(c["outcome"] == o for r in matrix.values() for c in r.values()) for o in OUTCOMES}
    return {
        "title": "9. The model zoo against the main schemes",
        "intro": (
            "Each zoo model (bench/model_zoo.py: tiny seeded random-init torchvision / timm / Hugging Face "
            "look-alikes and the real transformers BERT and GPT-2) in each upload form (TorchScript, an exported "
            "program, and the native checkpoint: a zipped `save_pretrained` folder, or a torchvision / timm "
            "state_dict named by its constructor with a small config), through each scheme as one engine job at "
            "one thread. First the upload trial the worker runs after inspection (worker/upload_trials.py): a "
            "scheme that fails there is `refused` at submit with the trial's sentence (422). Otherwise the job a "
            "user would submit runs in full: `ok` (size ratio original / artifact · speedup of the p50 latency, or "
            "`no change` within the noise · SQNR over every output, as the job reported them), `failed` (in the "
            "worker, with its sentence) or `crashed`. Each job gets 32 seeded random samples of its inputs as "
            "calibration data. Random weights: SQNR and speed, not accuracy."
        ),
        "command": "python -m bench.run --only zoo",
        "matrix": matrix,
        "uploads": uploads,
        "counts": counts,
        "tables": [
            {
                "title": "Model (upload format) × scheme",
                "columns": ["model (upload)", *schemes],
                "rows": [
                    [label, *(_show_cell(matrix[label].get(s, {"outcome": "not run"})) for s in schemes)]
                    for label in matrix
                ],
            }
        ],
        "notes": [
            f"{counts['ok']} cells ok, {counts['refused']} refused at submit, {counts['failed']} failed in the "
            f"worker, {counts['crashed']} crashed.",
            *notes,
        ],
    }


def _child(name: str, form: str, scratch: str, schemes: list[str]) -> None:
    """One upload's cells, a JSON line as each phase starts and as each cell ends (the parent survives a crash)."""
    import warnings

    from bench import model_zoo as zoo
    from worker.compression.torchvision_ops import declare_torchvision_ops
    from worker.compression.trial_plan import trial_key

    warnings.simplefilter("ignore")
    declare_torchvision_ops()  # transformers imports torchvision when it is installed
    torch.set_num_threads(1)
    entry = zoo.build(name)
    folder = Path(tempfile.mkdtemp(prefix=f"{name}-{form}-", dir=scratch))
    upload = save_upload(entry, folder, form)
    fmt = upload[1]

    def say(scheme: str, **fields: Any) -> None:
        print(json.dumps({"scheme": scheme, "format": fmt, **fields}, default=str), flush=True)

    for method, scheme, options in SCHEMES:
        if scheme not in schemes:
            continue
        say(scheme, phase="trial")
        trial = _trial(trial_key(method, scheme), upload, entry, folder)
        if trial is not None and not trial["ok"]:
            say(scheme, cell={"outcome": "refused", "reason": trial["reason"][:300]})
            continue
        say(scheme, phase="job")
        say(scheme, cell=_cell(method, scheme, options, upload, entry))


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
