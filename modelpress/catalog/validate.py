"""Submit-time validation of a job's stages: each against its typed config and against the stages before it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from modelpress.catalog.specs import Device, SchemeSpec, SpecError
from modelpress.configs import StageConfig, parse_stage
from modelpress.options import MAX_STAGES


@dataclass(frozen=True)
class JobFacts:
    """What submit-time validation knows about a job without loading anything."""

    model_format: str
    device: Device = "cpu"
    has_dataset: bool = False
    dataset_has_labels: bool = False
    eval_has_labels: bool = False
    compute_capability: float | None = None
    live_devices: tuple[str, ...] | None = None
    # the most training processes (train.devices) one live worker can run, when workers are known
    max_train_devices: int | None = None
    # why inspection could not convert this TorchScript model to an exported program (None: it
    # could, or it was not tried because the upload declared no inputs)
    graph_conversion_error: str | None = None
    # where the job's artifact runs (the target's runtime)
    runtime: str = "torch"
    # {"method:scheme": the sentence it failed with} for the schemes tried on this upload that failed
    # (worker.compression.scheme_trials); a first stage of such a scheme is refused
    trial_refusals: Mapping[str, str] = field(default_factory=dict)


def trial_refusals(inspection: Mapping[str, Any] | None) -> dict[str, str]:
    """The failed upload trials recorded in a model's inspection: {"method:scheme": reason}."""
    trials = (inspection or {}).get("scheme_trials")
    results = trials.get("results") if isinstance(trials, Mapping) else None
    if not isinstance(results, Mapping):
        return {}
    return {
        str(key): str(result.get("reason") or "it failed")
        for key, result in results.items()
        if isinstance(result, Mapping) and result.get("ok") is False
    }


@dataclass
class ValidatedStage:
    """A stage that can run: its typed config, and the scheme and options read off it."""

    config: StageConfig
    spec: SchemeSpec = field(init=False)
    options: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.spec = SchemeSpec(type(self.config))
        self.options = self.config.options()


def validate_stages(stages: Sequence[dict[str, Any] | StageConfig], facts: JobFacts) -> list[ValidatedStage]:
    """Check every stage against its typed config and against the stages before it."""
    if not stages:
        raise SpecError("a job needs at least one stage")
    if len(stages) > MAX_STAGES:
        raise SpecError(f"stages: a job has at most {MAX_STAGES} stages, got {len(stages)}")
    validated: list[ValidatedStage] = []
    current_format = facts.model_format
    quantized_by: str | None = None
    for index, stage in enumerate(stages):
        where = f"stages[{index}]"
        # the options' own types and bounds first, so a bad value is named even when the job
        # cannot run for another reason too
        config = parse_stage(stage, where)
        spec = SchemeSpec(type(config))
        options = config.options()
        if facts.device not in spec.devices:
            raise SpecError(f"{where}: scheme {spec.name!r} runs on {list(spec.devices)}, not on {facts.device!r}")
        if (
            spec.min_compute_capability
            and facts.compute_capability is not None
            and facts.compute_capability < spec.min_compute_capability
        ):
            raise SpecError(f"{where}: scheme {spec.name!r} needs compute capability >= {spec.min_compute_capability}")
        tried = facts.trial_refusals.get(f"{spec.method}:{config.scheme}")
        if (
            index == 0
            and tried is not None
            and facts.runtime == "torch"
            and facts.device == "cpu"
            and _as_tried(config)
        ):
            raise SpecError(
                f"{where}: {spec.method} {config.scheme!r} was tried on this model when it was uploaded and "
                f"failed: {tried}"
            )
        if quantized_by is not None and spec.method in ("prune", "distill", "analyze"):
            raise SpecError(
                f"{where}: {spec.method} needs float weights, but stage {quantized_by} already quantized them"
            )
        if spec.needs_dataset and not facts.has_dataset:
            raise SpecError(f"{where}: scheme {spec.name!r} needs a dataset_id (calibration or training data)")
        if (
            current_format == "torchscript"
            and "torchscript" not in spec.input_formats
            and "exported_program" in spec.input_formats
        ):
            # the worker converts the TorchScript model with torch's TS2EPConverter first
            if facts.graph_conversion_error:
                raise SpecError(
                    f"{where}: scheme {spec.name!r} runs on an exported program, and this TorchScript "
                    f"model could not be converted to one: {facts.graph_conversion_error}"
                )
            current_format = "exported_program"
        if current_format not in spec.input_formats:
            raise SpecError(
                f"{where}: scheme {spec.name!r} needs an eager model (state_dict + architecture, or an "
                f"exported program); a {current_format} model cannot be changed that way"
            )
        if spec.needs_labels and not facts.dataset_has_labels:
            raise SpecError(f"{where}: scheme {spec.name!r} needs a dataset with labels")
        _validate_nested(spec, options, facts, where)
        if spec.quantizes and quantized_by is None:
            quantized_by = str(index)
        validated.append(ValidatedStage(config))
    return validated


# options that change how much a scheme does, not whether it can run on a model: a trial with the
# scheme's defaults speaks for any value of these, and for no other option changed
TRIAL_FREE_OPTIONS = frozenset({"amount"})


def _as_tried(config: StageConfig) -> bool:
    """Whether the stage is the scheme the upload trial ran: its defaults, up to TRIAL_FREE_OPTIONS."""
    defaults = parse_stage({"method": config.method, "scheme": config.scheme}, "trial").options()
    options = config.options()
    return all(options.get(name) == defaults.get(name) for name in (set(options) | set(defaults)) - TRIAL_FREE_OPTIONS)


def _validate_nested(spec: SchemeSpec, options: dict[str, Any], facts: JobFacts, where: str) -> None:
    # the shapes and bounds of schedule, layers, train and candidates were checked by the stage's config
    if options.get("schedule") and not facts.dataset_has_labels:
        raise SpecError(f"{where}.schedule: gradual pruning fine-tunes, so it needs a dataset_id with labels")
    devices = (options.get("train") or {}).get("devices")
    if isinstance(devices, int) and facts.max_train_devices is not None and devices > facts.max_train_devices:
        raise SpecError(
            f"{where}.train.devices is {devices}, but the largest live worker runs at most "
            f"{facts.max_train_devices} training processes on {facts.device!r}"
        )
    recipes = (options.get("candidates") or {}).get("recipes") or []
    for number, recipe in enumerate(recipes):
        if any(isinstance(stage, dict) and stage.get("method") == "search" for stage in recipe):
            raise SpecError(f"{where}.candidates.recipes[{number}]: a search recipe cannot hold a search")
        try:
            validate_stages(recipe, facts)
        except SpecError as error:
            raise SpecError(f"{where}.candidates.recipes[{number}]: {error}") from None
    if spec.name == "codebook" and options.get("finetune_epochs") and not facts.dataset_has_labels:
        raise SpecError(f"{where}: finetune_epochs trains the shared centroids, so it needs a dataset_id with labels")
    if spec.name == "nm_semi_structured" and options["n"] >= options["m"]:
        raise SpecError(f"{where}: n must be smaller than m, got {options['n']}:{options['m']}")
    if spec.method == "search" and options.get("max_accuracy_drop") is None and options.get("min_sqnr_db") is None:
        raise SpecError(f"{where}: search needs max_accuracy_drop or min_sqnr_db")
    if options.get("max_accuracy_drop") is not None and not facts.eval_has_labels:
        raise SpecError(f"{where}: max_accuracy_drop needs an eval_dataset_id with labels")
    if options.get("smoothquant") and not facts.has_dataset:
        raise SpecError(f"{where}.smoothquant measures activation ranges, so it needs a dataset_id (calibration data)")
    if (options.get("smoothquant") or options.get("quantize_embeddings")) and facts.model_format == "torchscript":
        raise SpecError(
            f"{where}: smoothquant and quantize_embeddings rewrite an eager model; upload a state_dict "
            "with its architecture or an exported program, not TorchScript"
        )
    if spec.method == "analyze" and options.get("quantization") == "static_int8":
        if not facts.has_dataset:
            raise SpecError(f"{where}: probing static_int8 needs a dataset_id (calibration data)")
        if facts.model_format == "torchscript":
            raise SpecError(
                f"{where}: static_int8 needs an eager model (state_dict + architecture, or an "
                "exported program); probe dynamic_int8 on a TorchScript model"
            )
    if spec.method == "distill":
        student = options.get("student")
        if student != "auto" and not (
            isinstance(student, dict) and ("model_id" in student or "architecture" in student)
        ):
            raise SpecError(f'{where}.student must be "auto", {{"model_id": ...}} or {{"architecture": ...}}')
        if student == "auto" and facts.model_format == "torchscript" and facts.graph_conversion_error:
            raise SpecError(
                f'{where}: student "auto" narrows a TorchScript teacher converted to an exported program, and '
                f"this one could not be converted: {facts.graph_conversion_error}; give a student "
                "(model_id or architecture)"
            )
