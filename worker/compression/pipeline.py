"""A whole job in one call: load, measure, run the stages, save, measure again.

`run_job` is what the worker's sandboxed child executes; `modelpress compress
--local` calls it in-process. Pure torch: it reports through callbacks.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelpress.configs import SpecError, StageConfig, parse_stage
from worker.compression import breadcrumbs, outcome
from worker.compression import metrics as measure
from worker.compression.base import Dataset, EngineError, StageContext, StageResult
from worker.compression.facts import environment, has_recurrent_layers, layer_sparsity
from worker.compression.handlers import compress
from worker.compression.inputs import (
    Batch,
    ModelInputs,
    Signature,
    call_model,
    make_example,
)
from worker.compression.io import default_output_format, load_artifact, load_dataset, load_model, save_artifact
from worker.compression.pipeline_target import finish_for_runtime
from worker.compression.torchscript_conversion import constants_by_name, torchscript_to_graph

DEFAULT_BATCH_FROM_DATASET = 32


@dataclass
class ModelRef:
    path: str
    format: str
    architecture: dict[str, Any] | None = None


@dataclass
class StageSpec:
    """A stage as a job stores it, before it is read as its typed config."""

    method: str
    scheme: str
    options: dict[str, Any] = field(default_factory=dict)

    def to_config(self, where: str = "stage") -> StageConfig:
        try:
            return parse_stage({"method": self.method, "scheme": self.scheme, **self.options}, where)
        except SpecError as error:
            raise EngineError(str(error)) from error


@dataclass
class JobRequest:
    model: ModelRef
    # each stage's typed config (StageSpecs given here are read as theirs)
    stages: list[StageConfig]
    artifact_path: str
    example_input_shape: list[int] | None = None
    dataset_path: str | None = None
    eval_dataset_path: str | None = None
    device: str = "cpu"
    output_format: str | None = None
    extra_models: dict[str, ModelRef] = field(default_factory=dict)
    seed: int = 0
    threads: int = 1
    # where the artifact will run: torch, onnxruntime or executorch (worker.compression.targets)
    runtime: str = "torch"
    # the forward call as declared (worker.compression.inputs); example_input_shape is the shorthand
    inputs: list[dict[str, Any]] | None = None
    forward_kwargs: dict[str, Any] | None = None
    output: int | str | None = None
    # seconds for the interleaved latency comparison (None: the default); upload trials only check it runs
    latency_budget_s: float | None = None

    def __post_init__(self) -> None:
        self.stages = [
            stage.to_config(f"stages[{index}]") if isinstance(stage, StageSpec) else stage
            for index, stage in enumerate(self.stages)
        ]

    @property
    def signature(self) -> Signature | None:
        return Signature.from_request(self.inputs, self.example_input_shape, self.forward_kwargs, self.output)

    def to_dict(self) -> dict[str, Any]:
        """The request as JSON values, each stage as {"method", "scheme", "options"}: what from_dict reads."""
        typed = ("model", "stages", "extra_models")
        data = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name not in typed}
        data["model"] = asdict(self.model)
        data["stages"] = [{"method": s.method, "scheme": s.scheme, "options": s.options()} for s in self.stages]
        data["extra_models"] = {model_id: asdict(ref) for model_id, ref in self.extra_models.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobRequest:
        data = dict(data)
        data["model"] = ModelRef(**data["model"])
        data["stages"] = [StageSpec(**s) for s in data["stages"]]
        data["extra_models"] = {k: ModelRef(**v) for k, v in (data.get("extra_models") or {}).items()}
        return cls(**data)


@dataclass
class Reporter:
    progress: Callable[[float, str], None] = lambda fraction, stage: None
    event: Callable[[str, dict[str, Any]], None] = lambda kind, data: None
    check_cancelled: Callable[[], None] = lambda: None


def _example_input(request: JobRequest, train: Dataset | None, evaluation: Dataset | None) -> Batch:
    signature = request.signature
    if signature is not None and signature.inputs:
        return make_example(signature, seed=request.seed)
    data = train or evaluation
    if data is None:
        raise EngineError("example_input_shape (or inputs) is required when no dataset gives the input shape")
    return data.inputs[:DEFAULT_BATCH_FROM_DATASET].clone()


def _needs_graph(stage: StageConfig) -> bool:
    """Whether the stage's scheme takes eager / exported models only, so a TorchScript model is converted."""
    return "torchscript" not in stage.input_formats and "exported_program" in stage.input_formats


def run_job(request: JobRequest, reporter: Reporter | None = None) -> dict[str, Any]:
    """Run every stage of `request` and return the metrics document and artifact facts."""
    reporter = reporter or Reporter()
    torch.manual_seed(request.seed)
    device = torch.device("cuda" if request.device == "cuda" and torch.cuda.is_available() else "cpu")
    if request.device == "cuda" and device.type != "cuda":
        raise EngineError("the job targets cuda but this worker has no CUDA device")
    reporter.progress(0.01, "loading")
    breadcrumbs.stage("loading")
    breadcrumbs.operation(f"loading the {request.model.format} model file")
    model, kind = load_model(Path(request.model.path), request.model.format, request.model.architecture)
    if request.inputs is None and request.example_input_shape is None:
        from worker.compression.huggingface import declared_inputs, is_transformers_upload

        # a transformers config says what the model takes: token ids over its vocabulary, or images
        if is_transformers_upload(request.model.format, request.model.architecture):
            request = dataclasses.replace(request, inputs=declared_inputs(model))
    signature = request.signature
    if kind == "graph":
        constants_by_name(model, signature)  # a program exported with its constants positional
    train = load_dataset(Path(request.dataset_path), signature) if request.dataset_path else None
    evaluation = load_dataset(Path(request.eval_dataset_path), signature) if request.eval_dataset_path else None
    example = _example_input(request, train, evaluation)
    schemes = [f"{stage.method}:{stage.scheme}" for stage in request.stages]
    breadcrumbs.model_facts(kind=kind, recurrent=has_recurrent_layers(model), stages=schemes)
    breadcrumbs.operation("running the model on the example input")
    try:
        with torch.inference_mode():
            call_model(model, example)
    except Exception as error:
        described = example.describe() if isinstance(example, ModelInputs) else f"shape {list(example.shape)}"
        raise EngineError(f"the model does not run on an input of {described}: {error}") from error
    extra = {
        model_id: load_model(Path(ref.path), ref.format, ref.architecture)
        for model_id, ref in request.extra_models.items()
    }

    reporter.progress(0.05, "measuring original")
    breadcrumbs.stage("measuring the original")
    fid_inputs, fid_labels = measure.fidelity_inputs(example, evaluation, train, seed=request.seed, signature=signature)
    reference = measure.predict(model, fid_inputs, output=request.output)
    parameters = measure.count_parameters(model)
    # latency is measured at the end, interleaved with the compressed model's (measure.compare_latency)
    original = measure.describe(
        model,
        size_bytes=Path(request.model.path).stat().st_size,
        example_input=example,
        threads=request.threads,
        outputs=reference,
        labels=fid_labels,
        parameters=parameters,
        latency=False,
    )

    weights_before = outcome.weight_fingerprints(model)
    stage_reports: list[dict[str, Any]] = []
    result: StageResult | None = None
    requires: set[str] = set()
    span = 0.8 / max(1, len(request.stages))
    working = copy.deepcopy(model) if kind != "torchscript" else model
    deferred = None
    for index, stage in enumerate(request.stages):
        base = 0.1 + index * span
        if request.runtime != "torch" and stage.method == "quantize":
            from worker.compression.targets.deploy import DeferredQuantization

            # the target runtime quantizes the exported float model with its own tools
            deferred = DeferredQuantization(stage.scheme, stage.options())
            continue
        label = f"{stage.method}:{stage.scheme}"

        def stage_progress(fraction: float, message: str, base: float = base, label: str = label) -> None:
            breadcrumbs.operation(message or "running")
            reporter.progress(base + span * min(max(fraction, 0.0), 1.0), f"{label}: {message}" if message else label)

        reporter.check_cancelled()
        breadcrumbs.stage(label)
        stage_progress(0.0, "starting")
        if kind == "torchscript" and _needs_graph(stage):
            stage_progress(0.0, "converting TorchScript to an exported program")
            working, kind = torchscript_to_graph(working, signature, example), "graph"
            reporter.event(
                "log",
                {
                    "message": f"{label}: the TorchScript model was converted to an exported program "
                    "(torch._export.converter.TS2EPConverter) for this stage"
                },
            )
        context = StageContext(
            kind=kind,
            example_input=example,
            device=device,
            train_data=train,
            eval_data=evaluation,
            progress=stage_progress,
            event=reporter.event,
            check_cancelled=reporter.check_cancelled,
            seed=request.seed,
            extra_models=extra,
            original_size_bytes=original["size_bytes"],
            signature=signature,
            output_format=request.output_format,
            threads=request.threads,
            runtime=request.runtime,
        )
        result = compress(working, stage, context)
        working, kind = result.model, result.kind
        if request.runtime != "torch" and "runtime_quantization" in result.info:
            from worker.compression.search_runtime import chosen_runtime_quantization

            # the search chose a quantization that the target runtime's tools apply at the end
            deferred, train = chosen_runtime_quantization(result.info, train, example, signature, request.seed)
        requires.update(result.requires)
        # Quantized modules pack their weights out of reach of a parameter count, so a
        # quantize stage keeps the float model's count; a stage may report its own.
        if "parameters" in result.info:
            parameters = (int(result.info["parameters"][0]), int(result.info["parameters"][1]))
        elif stage.method != "quantize":
            parameters = measure.count_parameters(working)
        outputs = measure.predict(working, fid_inputs, output=request.output)
        stage_reports.append(
            {
                "method": stage.method,
                "scheme": stage.scheme,
                "parameters": parameters[0],
                "nonzero_parameters": parameters[1],
                "sparsity": round(1 - parameters[1] / parameters[0], 6) if parameters[0] else 0.0,
                "accuracy": measure.accuracy(outputs, fid_labels),
                "fidelity": measure.fidelity(reference, outputs),
                "info": result.info,
            }
        )

    if request.runtime != "torch":
        return finish_for_runtime(
            request,
            model,
            working,
            deferred,
            example,
            fid_inputs,
            fid_labels,
            reference,
            original,
            parameters,
            stage_reports,
            train,
            reporter,
            device,
        )
    reporter.progress(0.92, "saving artifact")
    breadcrumbs.stage("saving the artifact")
    output_format = request.output_format or default_output_format(
        kind, result.preferred_output_format if result else None
    )
    artifact = Path(request.artifact_path)
    if _hands_back_the_upload(request, result, output_format):
        shutil.copyfile(request.model.path, artifact)  # the very bytes uploaded, not a bigger re-save
    else:
        save_artifact(working, kind, output_format, artifact, example, signature)
    # Measure what the user downloads: reload the artifact where it is a runnable module.
    final_model: nn.Module = working
    if output_format in ("torchscript", "exported_program"):
        loaded = load_artifact(artifact, output_format)
        assert isinstance(loaded, nn.Module)
        final_model = loaded
    elif output_format == "deep_compression":
        final_model = _decoded_container(artifact, working, stage_reports)
    reporter.progress(0.95, "measuring compressed")
    breadcrumbs.stage("measuring the artifact")
    breadcrumbs.operation(f"running the {output_format} artifact on the fidelity inputs")
    outputs = measure.predict(final_model, fid_inputs, output=request.output)
    compressed = measure.describe(
        final_model,
        size_bytes=artifact.stat().st_size,
        example_input=example,
        threads=request.threads,
        outputs=outputs,
        labels=fid_labels,
        parameters=parameters,
        latency=False,
    )
    breadcrumbs.operation("timing the original and the artifact, interleaved")
    budget = {} if request.latency_budget_s is None else {"budget_s": request.latency_budget_s}
    speed = measure.compare_latency(model, final_model, example, request.threads, **budget)
    original.update(speed["original"])
    compressed.update(speed["compressed"])
    document = build_metrics(
        original,
        compressed,
        measure.fidelity(reference, outputs),
        stage_reports,
        device=device,
        batch_size=len(example),
        threads=request.threads,
        speed=speed,
        untouched=outcome.untouched_majority(weights_before, working, _left_alone(stage_reports)),
    )
    if output_format == "sparse_state_dict" and document["compression_ratio"] < outcome.GAIN_WARNING_BELOW:
        document["warnings"].append(
            "CSR storage of the pruned weights pays off only above about 50% zeros; "
            'output_format "compact_state_dict" stores each zero in about one bit '
            "(the README shows how to load it)"
        )
    document["environment"] = environment(device)
    document["layers"] = layer_sparsity(working)  # the delivered model's zeros per layer, for the report
    for report in stage_reports:
        if "result" in report["info"]:
            document["result"] = report["info"]["result"]
        if "sensitivity" in report["info"]:
            document["sensitivity"] = report["info"]["sensitivity"]
            if "pruning_sensitivity" in report["info"]:
                document["pruning_sensitivity"] = report["info"]["pruning_sensitivity"]
            if "suggested_skip_layers" in report["info"]:
                document["suggested_skip_layers"] = report["info"]["suggested_skip_layers"]
        # a stage's own warnings are part of the outcome, not buried in its info
        document["warnings"].extend(w for w in report["info"].get("warnings") or [] if w not in document["warnings"])
    return {"metrics": document, "artifact_format": output_format, "requires": sorted(requires)}


def _decoded_container(artifact: Path, working: nn.Module, stage_reports: list[dict[str, Any]]) -> nn.Module:
    """The model as the README's loader gives it back from the file, and the file's figures in the last
    encode stage's info (bits per weight)."""
    from modelpress.deep_compression_format import decode, describe

    data = artifact.read_bytes()
    decoded = copy.deepcopy(working)
    state = {name: torch.from_numpy(array) for name, array in decode(data).items()}
    decoded.load_state_dict(state, strict=True)
    for report in reversed(stage_reports):
        if report["method"] == "encode":
            report["info"]["container"] = describe(data)
            break
    return decoded.eval()


def _left_alone(stage_reports: list[dict[str, Any]]) -> frozenset[str]:
    """Layers the job's one stage said it left as they were (e.g. an LSTM int8 could not reach)."""
    if len(stage_reports) != 1:
        return frozenset()  # an earlier stage may have changed what a later one left alone
    return frozenset(stage_reports[0]["info"].get("left_float") or {})


def _hands_back_the_upload(request: JobRequest, result: StageResult | None, output_format: str) -> bool:
    """True when every stage left the model as uploaded and the upload already is in `output_format`."""
    return (
        result is not None
        and bool(result.info.get("delivers_original"))
        and len(request.stages) == 1
        and request.model.format == output_format
        and output_format in ("torchscript", "exported_program")
    )


def build_metrics(
    original: dict[str, Any],
    compressed: dict[str, Any],
    fidelity: dict[str, Any],
    stages: list[dict[str, Any]],
    *,
    device: torch.device,
    batch_size: int,
    threads: int,
    speed: dict[str, Any],
    untouched: tuple[str, float] | None = None,
) -> dict[str, Any]:
    """The metrics document. `speed` is measure.compare_latency's: the speedup with its interval and verdict."""
    ratio = original["size_bytes"] / compressed["size_bytes"]
    speedup = speed["speedup"]
    warnings = outcome.outcome_warnings(ratio, fidelity, untouched)
    if speed["speed_verdict"] == "slower":
        warnings.append(
            f"the compressed model is slower than the original at batch {batch_size} "
            f"on {device.type} ({speedup:.2f}x, {speed['speedup_low']:.2f}-{speed['speedup_high']:.2f})"
        )
    device_name = "cpu" if device.type == "cpu" else f"cuda:{torch.cuda.get_device_name(device)}"
    return {
        "original": original,
        "compressed": compressed,
        "compression_ratio": round(ratio, 4),
        # the median of interleaved rounds; within the noise band the verdict says "no measurable change"
        "speedup": speedup,
        "speedup_low": speed["speedup_low"],
        "speedup_high": speed["speedup_high"],
        "speed_verdict": speed["speed_verdict"],
        "speed_measurement": {
            "rounds": speed["speed_rounds"],
            "calls_per_round": speed["speed_calls_per_round"],
            "confidence": measure.SPEED_CONFIDENCE,
            "min_effect": measure.SPEED_MIN_EFFECT,
            "interleaved": True,
        },
        "fidelity": fidelity,
        "device": device_name,
        "batch_size": batch_size,
        "eval_batch_size": measure.EVAL_BATCH_SIZE,
        "threads": threads,
        "torch_version": torch.__version__,
        "stages": stages,
        "warnings": warnings,
    }
