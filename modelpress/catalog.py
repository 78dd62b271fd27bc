"""The catalogue of methods, schemes and their options.

Pure data and validation, no torch: the API validates job specs with it at
submit time (so a job that cannot run answers 422 before any worker time is
spent), `GET /v1/methods` publishes it, and the engine reads the same
definitions, so the three can never disagree.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from modelpress.options import MAX_STAGES, OPTION_MODELS, first_problem, object_size_problem

OptionKind = Literal["float", "int", "bool", "str", "str_list", "object", "str_or_object"]
Device = Literal["cpu", "cuda"]

# Model formats as users upload them. state_dict and safetensors become eager
# modules (a registered architecture), exported programs become graph modules.
MODEL_FORMATS = ("torchscript", "state_dict", "safetensors", "exported_program")
EAGER_FORMATS = ("state_dict", "safetensors", "exported_program")
OUTPUT_FORMATS = ("torchscript", "exported_program", "state_dict", "sparse_state_dict", "compact_state_dict",
                  "deep_compression", "onnx", "executorch")


class SpecError(ValueError):
    """A job spec that cannot run; the message says why, for a 422."""


@dataclass(frozen=True)
class OptionSpec:
    name: str
    kind: OptionKind
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    maximum_exclusive: bool = False
    choices: tuple[str, ...] | None = None
    help: str = ""

    def validate(self, value: Any, where: str) -> None:
        label = f"{where}.{self.name}"
        if self.kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SpecError(f"{label} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise SpecError(f"{label} must be a finite number, got {value!r}")
        elif self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise SpecError(f"{label} must be an integer, got {value!r}")
        elif self.kind == "bool":
            if not isinstance(value, bool):
                raise SpecError(f"{label} must be true or false, got {value!r}")
        elif self.kind == "str":
            if not isinstance(value, str) or len(value) > 256:
                raise SpecError(f"{label} must be a string of at most 256 characters, got {value!r:.80}")
        elif self.kind == "str_list":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise SpecError(f"{label} must be a list of strings")
        elif self.kind == "object":
            if not isinstance(value, dict):
                raise SpecError(f"{label} must be an object")
        elif self.kind == "str_or_object":
            if not isinstance(value, (str, dict)):
                raise SpecError(f"{label} must be a string or an object")
        if self.kind in ("float", "int"):
            if self.minimum is not None and value < self.minimum:
                raise SpecError(f"{label} must be >= {self.minimum}, got {value}")
            if self.maximum is not None:
                too_big = value >= self.maximum if self.maximum_exclusive else value > self.maximum
                if too_big:
                    bound = "<" if self.maximum_exclusive else "<="
                    raise SpecError(f"{label} must be {bound} {self.maximum}, got {value}")
        if self.choices is not None and value not in self.choices:
            raise SpecError(f"{label} must be one of {list(self.choices)}, got {value!r}")
        if self.kind in ("str_list", "object", "str_or_object"):
            if problem := object_size_problem(value, label):
                raise SpecError(problem)
        model = OPTION_MODELS.get(self.name)
        if model is not None and isinstance(value, dict):
            try:
                model.model_validate(value)
            except ValidationError as error:
                raise SpecError(first_problem(error, label)) from None


@dataclass(frozen=True)
class SchemeSpec:
    method: str
    name: str
    summary: str
    devices: tuple[Device, ...] = ("cpu",)
    input_formats: tuple[str, ...] = MODEL_FORMATS
    needs_dataset: bool = False
    needs_labels: bool = False
    # Changes weights to a non-float representation: later stages that need
    # float weights (pruning, distillation) cannot follow it.
    quantizes: bool = False
    min_compute_capability: float | None = None
    options: tuple[OptionSpec, ...] = ()
    library: str = ""

    def describe(self) -> dict[str, Any]:
        data = asdict(self)
        data["options"] = [asdict(o) for o in self.options]
        return data


_LAYERS = OptionSpec("layers", "object", None,
                     help='{"include": [globs], "exclude": [globs]} on module names')
_AMOUNT = OptionSpec("amount", "float", 0.5, 0.0, 1.0, True, help="fraction of weights to remove")
_KEEP_CLASSIFIER = OptionSpec("prune_classifier", "bool", False,
                              help="also prune the final classifier layer")
_SCHEDULE = OptionSpec("schedule", "object", None,
                       help='{"steps": N, "finetune_epochs": E}: gradual pruning (Zhu & Gupta 2017); needs a dataset')
_TRAIN = OptionSpec("train", "object", None, help="training-loop options (optimizer, lr, epochs, ...)")
_SKIP = OptionSpec("skip_layers", "str_list", [], help="glob patterns of module names left in float")
_KEEP_ENDS = OptionSpec("keep_first_last_float", "bool", False, help="leave the first and last layers in float")

_PRUNE_COMMON = (_AMOUNT, _LAYERS, _KEEP_CLASSIFIER, _SCHEDULE, _TRAIN)
# A fidelity bar for int8: quantize everything, then keep the most harmful layers in float until it holds.
_BAR = (OptionSpec("min_sqnr_db", "float", None, 0.0, 200.0,
                   help="mixed precision: keep the fewest, most harmful layers in float until the whole model's "
                        "SQNR against the float outputs is at least this"),
        OptionSpec("max_accuracy_drop", "float", None, 0.0, 1.0,
                   help="mixed precision: the same for the top-1 drop; needs an eval dataset with labels"))

# Outlier-aware int8 for transformers (worker/compression/smoothquant.py).
_OUTLIERS = (OptionSpec("smoothquant", "bool", False,
                        help="migrate activation outliers into the weights before quantizing (SmoothQuant, "
                             "Xiao et al. 2023); measures activation ranges on the dataset, so needs a dataset_id"),
             OptionSpec("alpha", "float", 0.5, 0.0, 1.0,
                        help="smoothquant migration strength: s = max|X|^alpha / max|W|^(1-alpha)"),
             OptionSpec("calibration_batches", "int", 16, 1, 10_000,
                        help="smoothquant: batches of 32 samples whose activation ranges are measured"),
             OptionSpec("quantize_embeddings", "bool", False,
                        help="also store nn.Embedding tables as int8 (weight-only, one scale per row)"))

SCHEMES: tuple[SchemeSpec, ...] = (
    SchemeSpec("prune", "l1_unstructured", "zero the smallest-magnitude weights of each layer",
               ("cpu", "cuda"), options=_PRUNE_COMMON, library="torch.nn.utils.prune"),
    SchemeSpec("prune", "random_unstructured", "zero random weights of each layer",
               ("cpu", "cuda"), options=_PRUNE_COMMON, library="torch.nn.utils.prune"),
    SchemeSpec("prune", "global_l1_unstructured", "one magnitude threshold across all chosen layers",
               ("cpu", "cuda"), options=_PRUNE_COMMON, library="torch.nn.utils.prune"),
    SchemeSpec("prune", "ln_structured",
               "remove whole output channels / neurons by their Ln norm; shapes shrink",
               ("cpu", "cuda"), input_formats=EAGER_FORMATS,
               options=_PRUNE_COMMON + (OptionSpec("norm", "float", 2.0, 1.0, 100.0),),
               library="torch-pruning (dependency graph)"),
    SchemeSpec("prune", "nm_semi_structured", "N of every M weights along the input dimension (2:4)",
               ("cpu", "cuda"),
               options=(OptionSpec("n", "int", 2, 1, 16), OptionSpec("m", "int", 4, 2, 32),
                        _LAYERS, _KEEP_CLASSIFIER, _TRAIN),
               library="torch (to_sparse_semi_structured on CUDA)"),
    SchemeSpec("quantize", "dynamic_int8", "int8 weights, activations quantized on the fly (Linear, LSTM, GRU)",
               ("cpu",), quantizes=True, options=(_SKIP, _KEEP_ENDS, *_BAR, *_OUTLIERS),
               library="torch.ao.quantization.quantize_dynamic / quantize_dynamic_jit"),
    SchemeSpec("quantize", "static_int8", "int8 weights and activations, calibrated on the dataset",
               ("cpu",), input_formats=EAGER_FORMATS, needs_dataset=True, quantizes=True,
               options=(_SKIP, _KEEP_ENDS, OptionSpec("calibration_batches", "int", 16, 1, 10_000), *_BAR),
               library="torchao PT2E (X86InductorQuantizer) / torch.ao FX"),
    SchemeSpec("quantize", "qat_int8",
               "quantization-aware training: fake-quantized fine-tuning on the dataset, then the static_int8 artifact",
               ("cpu",), input_formats=EAGER_FORMATS, needs_dataset=True, needs_labels=True, quantizes=True,
               options=(_SKIP, _KEEP_ENDS, OptionSpec("calibration_batches", "int", 16, 1, 10_000),
                        OptionSpec("train", "object", None,
                                   help="training-loop options for the fine-tune (default epochs 3, lr 1e-4)")),
               library="torchao PT2E QAT (prepare_qat_pt2e) / torch.ao FX convert"),
    SchemeSpec("quantize", "fp16", "half-precision weights and activations", ("cpu", "cuda"),
               quantizes=True, options=(_SKIP,), library="torch"),
    SchemeSpec("quantize", "bf16", "bfloat16 weights and activations", ("cpu", "cuda"),
               quantizes=True, options=(_SKIP,), library="torch"),
    SchemeSpec("quantize", "int8_weight_only", "torchao int8 weight-only", ("cuda",),
               input_formats=EAGER_FORMATS, quantizes=True, options=(_SKIP,), library="torchao"),
    SchemeSpec("quantize", "int8_dynamic", "torchao int8 dynamic activations, int8 weights", ("cuda",),
               input_formats=EAGER_FORMATS, quantizes=True, options=(_SKIP,), library="torchao"),
    SchemeSpec("quantize", "int4_weight_only", "torchao int4 weight-only (CUDA kernels)", ("cuda",),
               input_formats=EAGER_FORMATS, quantizes=True,
               options=(_SKIP, OptionSpec("group_size", "int", 128, 32, 256)), library="torchao"),
    SchemeSpec("quantize", "float8", "torchao float8 dynamic (compute capability >= 8.9)", ("cuda",),
               input_formats=EAGER_FORMATS, quantizes=True, min_compute_capability=8.9,
               options=(_SKIP,), library="torchao"),
    SchemeSpec("distill", "hinton", "knowledge distillation into a smaller student (Hinton et al. 2015)",
               ("cpu", "cuda"), needs_dataset=True,
               options=(OptionSpec("student", "str_or_object", "auto",
                                   help='"auto", {"architecture": {...}} or {"model_id": ...}'),
                        OptionSpec("width_multiplier", "float", 0.25, 0.01, 1.0),
                        OptionSpec("temperature", "float", 2.0, 0.1, 100.0),
                        OptionSpec("alpha", "float", 0.5, 0.0, 1.0),
                        OptionSpec("baseline", "bool", False,
                                   help="also train the student on labels alone (always done when the training "
                                        "and evaluation data have labels: the better of the two is delivered)"),
                        OptionSpec("sweep", "bool", True,
                                   help="with labels, also try a few (temperature, alpha) settings and deliver "
                                        "the best run, the baseline included"),
                        OptionSpec("sweep_time_budget_s", "float", 120.0, 1.0, 86400.0,
                                   help="no further sweep run starts once one more would pass this budget"),
                        OptionSpec("feature_layers", "object", None,
                                   help='{"teacher_layer": "student_layer"} pairs for feature distillation'),
                        OptionSpec("transfer_augmentation", "str", "none", choices=("mixup", "noise", "none"),
                                   help="extra teacher-labelled views of each batch (the teacher sees the same "
                                        "view as the student); float inputs only"),
                        _TRAIN),
               library="torch"),
)

SCHEMES += (
    SchemeSpec("search", "accuracy_aware",
               "the smallest (or fastest) model that meets an accuracy or fidelity bar, over recipes and amounts",
               ("cpu",), options=(
                   OptionSpec("max_accuracy_drop", "float", None, 0.0, 1.0,
                              help="absolute top-1 drop allowed; needs an eval dataset with labels"),
                   OptionSpec("min_sqnr_db", "float", None, 0.0, 200.0, help="fidelity bar; no labels needed"),
                   OptionSpec("objective", "str", "size", choices=("size", "latency")),
                   OptionSpec("candidates", "object", None,
                              help='{"recipes": [[stage, ...], ...], "amount": {"min": 0.3, "max": 0.95}}'),
                   OptionSpec("max_trials", "int", 12, 1, 200),
                   OptionSpec("time_budget_s", "float", 1800.0, 1.0, 86400.0),
                   _TRAIN),
               library="ModelPress search over the other methods"),
)

SCHEMES += (
    SchemeSpec("encode", "codebook",
               "k-means weight sharing over the nonzero weights (Han et al. 2016); an eager model is delivered "
               "in the deep_compression container (fp16 codebooks, Huffman-coded codes and relative index; "
               "modelpress.deep_compression_format loads it), or as TorchScript with output_format torchscript; "
               "run it after pruning",
               ("cpu", "cuda"), input_formats=EAGER_FORMATS, quantizes=True, options=(
                   OptionSpec("bits", "int", 5, 2, 8, help="code bits per weight: 2^bits shared values per layer"),
                   _LAYERS,
                   OptionSpec("prune_classifier", "bool", True,
                              help="also encode the final classifier layer (Han et al. encode every layer)"),
                   OptionSpec("min_sparsity", "float", 0.0, 0.0, 1.0,
                              help="Linear layers with fewer zeros than this stay in float"),
                   OptionSpec("finetune_epochs", "int", 0, 0, 100,
                              help="fine-tune the shared centroids and biases on the labelled training set "
                                   "(Han et al.); kept only when training accuracy does not drop")),
               library="torch (k-means, centroid fine-tuning), numpy (canonical Huffman); "
                       "TorchScript CodebookLinear for output_format torchscript"),
)

SCHEMES += (
    SchemeSpec("analyze", "sensitivity",
               "per-layer table: the whole model's SQNR (and top-1 drop with labels) with only that layer "
               "quantized, most harmful first, plus a verified skip_layers for a bar; delivers the model unchanged",
               ("cpu",), options=(
                   OptionSpec("quantization", "str", "dynamic_int8", choices=("dynamic_int8", "static_int8"),
                              help="the quantize scheme probed (static_int8 needs an eager or exported model "
                                   "and a dataset)"),
                   OptionSpec("samples", "int", 64, 1, 4096, help="probe-set size (from the eval, else training set)"),
                   OptionSpec("calibration_batches", "int", 16, 1, 10_000),
                   OptionSpec("min_sqnr_db", "float", None, 0.0, 200.0,
                              help="suggest the skip_layers that meet this SQNR (verified)"),
                   OptionSpec("max_accuracy_drop", "float", None, 0.0, 1.0,
                              help="suggest the skip_layers that meet this top-1 drop (verified; needs labels)")),
               library="ModelPress (torch.ao.quantization backends, one layer at a time)"),
)

# Presets expand into recipes (lists of stages); GET /v1/methods lists them.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu-int8": {"summary": "dynamic int8 quantization for CPU serving",
                 "stages": [{"method": "quantize", "scheme": "dynamic_int8"}]},
    "deep-compression": {
        "summary": "gradual magnitude pruning with fine-tuning, 5-bit k-means weight sharing with centroid "
                   "fine-tuning, and Huffman-coded codes and relative index in the weights-only "
                   "deep_compression container (Han et al. 2016)",
        "stages": [{"method": "prune", "scheme": "global_l1_unstructured", "amount": 0.92,
                    "prune_classifier": True, "schedule": {"steps": 5, "finetune_epochs": 5}},
                   {"method": "encode", "scheme": "codebook", "bits": 5, "finetune_epochs": 3}]},
    "distill-small": {"summary": "distil into a student a quarter of the teacher's width",
                      "stages": [{"method": "distill", "scheme": "hinton", "student": "auto",
                                  "width_multiplier": 0.25}]},
}


def expand_preset(name: str) -> list[dict[str, Any]]:
    if name not in PRESETS:
        raise SpecError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    return [dict(stage) for stage in PRESETS[name]["stages"]]


DEFAULT_SCHEME = {"distill": "hinton", "search": "accuracy_aware"}
METHODS = tuple(sorted({s.method for s in SCHEMES}))


def find_scheme(method: str, scheme: str | None) -> SchemeSpec:
    if method not in METHODS:
        raise SpecError(f"unknown method {method!r}; known methods: {list(METHODS)}")
    name = scheme or DEFAULT_SCHEME.get(method)
    if name is None:
        raise SpecError(f"method {method!r} needs a scheme")
    for spec in SCHEMES:
        if spec.method == method and spec.name == name:
            return spec
    known = [s.name for s in SCHEMES if s.method == method]
    raise SpecError(f"unknown scheme {name!r} for method {method!r}; known schemes: {known}")


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


@dataclass
class ValidatedStage:
    spec: SchemeSpec
    options: dict[str, Any] = field(default_factory=dict)


def validate_stages(stages: list[dict[str, Any]], facts: JobFacts) -> list[ValidatedStage]:
    """Check every stage against the catalogue and against the stages before it."""
    if not stages:
        raise SpecError("a job needs at least one stage")
    if len(stages) > MAX_STAGES:
        raise SpecError(f"stages: a job has at most {MAX_STAGES} stages, got {len(stages)}")
    validated: list[ValidatedStage] = []
    current_format = facts.model_format
    quantized_by: str | None = None
    for index, stage in enumerate(stages):
        where = f"stages[{index}]"
        if not isinstance(stage, dict) or "method" not in stage:
            raise SpecError(f"{where} needs a 'method'")
        spec = find_scheme(stage["method"], stage.get("scheme"))
        # the options' own types and bounds first, so a bad value is named even when the job
        # cannot run for another reason too
        known = {o.name: o for o in spec.options}
        options: dict[str, Any] = {}
        for key, value in stage.items():
            if key in ("method", "scheme"):
                continue
            if key not in known:
                raise SpecError(f"{where}: unknown option {key!r} for {spec.method}/{spec.name}; "
                                f"options: {sorted(known)}")
            if value is not None:
                known[key].validate(value, where)
            elif known[key].default is not None:
                raise SpecError(f"{where}.{key} must not be null (leave it out for the default "
                                f"{known[key].default!r})")
            options[key] = value
        for option in spec.options:
            options.setdefault(option.name, option.default)
        if facts.device not in spec.devices:
            raise SpecError(f"{where}: scheme {spec.name!r} runs on {list(spec.devices)}, not on {facts.device!r}")
        if (spec.min_compute_capability and facts.compute_capability is not None
                and facts.compute_capability < spec.min_compute_capability):
            raise SpecError(f"{where}: scheme {spec.name!r} needs compute capability >= {spec.min_compute_capability}")
        if quantized_by is not None and spec.method in ("prune", "distill", "analyze"):
            raise SpecError(f"{where}: {spec.method} needs float weights, but stage {quantized_by} already quantized them")
        if spec.needs_dataset and not facts.has_dataset:
            raise SpecError(f"{where}: scheme {spec.name!r} needs a dataset_id (calibration or training data)")
        if (current_format == "torchscript" and "torchscript" not in spec.input_formats
                and "exported_program" in spec.input_formats):
            # the worker converts the TorchScript model with torch's TS2EPConverter first
            if facts.graph_conversion_error:
                raise SpecError(f"{where}: scheme {spec.name!r} runs on an exported program, and this TorchScript "
                                f"model could not be converted to one: {facts.graph_conversion_error}")
            current_format = "exported_program"
        if current_format not in spec.input_formats:
            raise SpecError(
                f"{where}: scheme {spec.name!r} needs an eager model (state_dict + architecture, or an "
                f"exported program); a {current_format} model cannot be changed that way")
        if spec.needs_labels and not facts.dataset_has_labels:
            raise SpecError(f"{where}: scheme {spec.name!r} needs a dataset with labels")
        _validate_nested(spec, options, facts, where)
        if spec.quantizes and quantized_by is None:
            quantized_by = str(index)
        validated.append(ValidatedStage(spec, options))
    return validated


def _validate_nested(spec: SchemeSpec, options: dict[str, Any], facts: JobFacts, where: str) -> None:
    # the shapes and bounds of schedule, layers, train and candidates were checked by OptionSpec.validate
    if options.get("schedule") and not facts.dataset_has_labels:
        raise SpecError(f"{where}.schedule: gradual pruning fine-tunes, so it needs a dataset_id with labels")
    devices = (options.get("train") or {}).get("devices")
    if isinstance(devices, int) and facts.max_train_devices is not None and devices > facts.max_train_devices:
        raise SpecError(f"{where}.train.devices is {devices}, but the largest live worker runs at most "
                        f"{facts.max_train_devices} training processes on {facts.device!r}")
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
        raise SpecError(f"{where}: smoothquant and quantize_embeddings rewrite an eager model; upload a state_dict "
                        "with its architecture or an exported program, not TorchScript")
    if spec.method == "analyze" and options.get("quantization") == "static_int8":
        if not facts.has_dataset:
            raise SpecError(f"{where}: probing static_int8 needs a dataset_id (calibration data)")
        if facts.model_format == "torchscript":
            raise SpecError(f"{where}: static_int8 needs an eager model (state_dict + architecture, or an "
                            "exported program); probe dynamic_int8 on a TorchScript model")
    if spec.method == "distill":
        student = options.get("student")
        if student != "auto" and not (isinstance(student, dict) and ("model_id" in student or "architecture" in student)):
            raise SpecError(f'{where}.student must be "auto", {{"model_id": ...}} or {{"architecture": ...}}')
        if student == "auto" and facts.model_format == "torchscript":
            raise SpecError(f'{where}: student "auto" is derived from an eager teacher; a TorchScript teacher '
                            'needs an explicit student (model_id or architecture)')


@dataclass(frozen=True)
class RuntimeSpec:
    """A runtime an artifact can be built for: its format, devices and the schemes it takes.

    Quantize schemes are applied by the runtime's own tools on the exported float model;
    prune and distill stages run in PyTorch first and export as they are.
    """

    name: str
    output_format: str
    devices: tuple[Device, ...]
    schemes: dict[str, tuple[str, ...]]
    package: str
    library: str


_FLOAT_STAGES = {"prune": ("l1_unstructured", "random_unstructured", "global_l1_unstructured", "ln_structured",
                           "nm_semi_structured"),
                 "distill": ("hinton",)}
RUNTIMES: dict[str, RuntimeSpec] = {
    "onnxruntime": RuntimeSpec("onnxruntime", "onnx", ("cpu",),
                               {**_FLOAT_STAGES, "quantize": ("dynamic_int8", "static_int8")}, "onnxruntime",
                               "torch.onnx.export(dynamo=True); onnxruntime.quantization "
                               "(quantize_dynamic, quantize_static QDQ per-channel)"),
    "executorch": RuntimeSpec("executorch", "executorch", ("cpu",),
                              {**_FLOAT_STAGES, "quantize": ("dynamic_int8", "static_int8")}, "executorch",
                              "executorch.exir to_edge_transform_and_lower + XNNPACK partitioner; "
                              "XNNPACKQuantizer (PT2E) for int8"),
}
TORCH_FORMATS = ("torchscript", "exported_program", "state_dict", "sparse_state_dict", "deep_compression")


def resolve_runtime(runtime: str, runtime_given: bool, output_format: str | None) -> str:
    """The job's runtime: as given, else the one an onnx / executorch output_format implies."""
    if not runtime_given and runtime == "torch":
        for name, spec in RUNTIMES.items():
            if output_format == spec.output_format:
                return name
    return runtime


def validate_target(runtime: str, device: str, output_format: str | None, stages: list[dict[str, Any]],
                    model_format: str, installed: Any = None) -> None:
    """Check that the runtime can serve this job: format, device, every stage's scheme, the package.

    `installed(package) -> bool` says whether the worker image has the runtime's package (the API
    checks with importlib.util.find_spec, which imports nothing).
    """
    if runtime == "torch":
        if output_format in ("onnx", "executorch"):
            raise SpecError(f'output_format {output_format!r} is built for target.runtime '
                            f'{"onnxruntime" if output_format == "onnx" else "executorch"!r}, not torch')
        return
    spec = RUNTIMES[runtime]
    if output_format not in (None, spec.output_format):
        raise SpecError(f"target.runtime {runtime!r} serves output_format {spec.output_format!r}, "
                        f"not {output_format!r}")
    if device not in spec.devices:
        raise SpecError(f"target.runtime {runtime!r} runs on {list(spec.devices)} in this deployment, not {device!r}")
    if model_format == "torchscript":
        raise SpecError(f"a TorchScript model cannot be exported for {runtime}; upload an exported program "
                        "or a state_dict with its architecture")
    if installed is not None and not installed(spec.package):
        raise SpecError(f"target.runtime {runtime!r} needs the {spec.package!r} package, which this deployment "
                        "does not have installed")
    for index, stage in enumerate(stages):
        method, scheme = stage.get("method"), stage.get("scheme") or DEFAULT_SCHEME.get(str(stage.get("method")))
        if scheme not in spec.schemes.get(str(method), ()):
            supported = {m: list(s) for m, s in spec.schemes.items()}
            raise SpecError(f"stages[{index}]: {method}/{scheme} is not available for target.runtime {runtime!r}; "
                            f"it supports {supported}")


def describe_methods() -> dict[str, Any]:
    """The catalogue as `GET /v1/methods` publishes it."""
    return {
        "methods": [{"method": method, "schemes": [s.describe() for s in SCHEMES if s.method == method]}
                    for method in METHODS],
        "presets": [{"name": name, "summary": p["summary"], "stages": p["stages"]} for name, p in PRESETS.items()],
        "output_formats": list(OUTPUT_FORMATS),
        "runtimes": [{"runtime": "torch", "output_formats": list(TORCH_FORMATS), "devices": ["cpu", "cuda"],
                      "schemes": {m: [s.name for s in SCHEMES if s.method == m] for m in METHODS}}]
        + [{"runtime": r.name, "output_formats": [r.output_format], "devices": list(r.devices),
            "schemes": {m: list(s) for m, s in r.schemes.items()}, "library": r.library} for r in RUNTIMES.values()],
        "model_formats": list(MODEL_FORMATS),
    }


# ---------------------------------------------------------------- the forward call

INPUT_DTYPES = ("float16", "float32", "float64", "bfloat16", "int32", "int64", "bool")
INTEGER_DTYPES = ("int32", "int64")
MAX_INPUTS = 16
MAX_INPUT_RANK = 8
MAX_FORWARD_KWARGS = 16
# elements of all example inputs together (8 GiB as float32), as for example_input_shape
MAX_INPUT_ELEMENTS = 2**31
_INT_BOUNDS = {"int32": (-2**31, 2**31), "int64": (-2**63, 2**63)}


def validate_forward_call(inputs: list[dict[str, Any]] | None, forward_kwargs: dict[str, Any] | None,
                          output: int | str | None, where: str = "") -> None:
    """Check a declared forward call (see API.md, "Inputs and outputs as the model takes them").

    `inputs` entries have passed the API's shape model (name, shape, dtype, low, high, dynamic);
    this checks what ties their fields together.

    Example:
        >>> validate_forward_call([{"name": "ids", "shape": [1, 8], "dtype": "int64", "low": 0,
        ...                         "high": 100, "dynamic": [0, 1]}], {"sr": 16000}, 0)
    """
    prefix = f"{where}." if where else ""
    names: set[str] = set()
    total = 0
    for index, spec in enumerate(inputs or []):
        label = f"{prefix}inputs[{index}]"
        name, shape, dtype = spec.get("name"), list(spec.get("shape") or []), spec.get("dtype") or "float32"
        if name in names:
            raise SpecError(f"{label}.name {name!r} is declared twice")
        names.add(str(name))
        if dtype not in INPUT_DTYPES:
            raise SpecError(f"{label}.dtype must be one of {list(INPUT_DTYPES)}, got {dtype!r}")
        if not shape or len(shape) > MAX_INPUT_RANK or any(not isinstance(d, int) or d < 1 for d in shape):
            raise SpecError(f"{label}.shape must hold 1 to {MAX_INPUT_RANK} sizes >= 1, got {shape}")
        total += math.prod(shape)
        for dim in spec.get("dynamic") or []:
            if not 0 <= dim < len(shape):
                raise SpecError(f"{label}.dynamic names dimension {dim}, but the shape {shape} has {len(shape)}")
        low, high = spec.get("low"), spec.get("high")
        if dtype in INTEGER_DTYPES:
            lowest, highest = _INT_BOUNDS[dtype]
            low_value = 0 if low is None else low
            high_value = low_value + 2 if high is None else high
            if not lowest <= low_value < high_value <= highest:
                raise SpecError(f"{label}: low must be < high (high exclusive) within {dtype}, got "
                                f"low={low}, high={high}")
        elif low is not None or high is not None:
            raise SpecError(f"{label}: low / high bound random integers; {dtype} inputs take neither")
    if total > MAX_INPUT_ELEMENTS:
        raise SpecError(f"{prefix}inputs hold {total} elements in all; at most {MAX_INPUT_ELEMENTS}")
    kwargs = forward_kwargs or {}
    if len(kwargs) > MAX_FORWARD_KWARGS:
        raise SpecError(f"{prefix}forward_kwargs holds at most {MAX_FORWARD_KWARGS} arguments")
    for key, value in kwargs.items():
        if not key.isidentifier():
            raise SpecError(f"{prefix}forward_kwargs: {key!r} is not a Python argument name")
        if key in names:
            raise SpecError(f"{prefix}forward_kwargs: {key!r} is also a declared input")
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise SpecError(f"{prefix}forward_kwargs.{key} must be a number, string, bool or null; tensors go "
                            "in inputs")
        if isinstance(value, str) and len(value) > 256:
            raise SpecError(f"{prefix}forward_kwargs.{key}: strings hold at most 256 characters")
        if isinstance(value, float) and not math.isfinite(value):
            raise SpecError(f"{prefix}forward_kwargs.{key} must be finite")
    if isinstance(output, int) and not isinstance(output, bool) and not 0 <= output < 1024:
        raise SpecError(f"{prefix}output index must be in 0..1023, got {output}")
    if isinstance(output, str) and not (0 < len(output) <= 128):
        raise SpecError(f"{prefix}output key must hold 1 to 128 characters")
