"""Every method's schemes with their options, defaults and bounds; the presets; looking a scheme up."""

from __future__ import annotations

from typing import Any

from modelpress.catalog.specs import EAGER_FORMATS, OptionSpec, SchemeSpec, SpecError

_LAYERS = OptionSpec("layers", "object", None, help='{"include": [globs], "exclude": [globs]} on module names')
_AMOUNT = OptionSpec("amount", "float", 0.5, 0.0, 1.0, True, help="fraction of weights to remove")
_KEEP_CLASSIFIER = OptionSpec("prune_classifier", "bool", False, help="also prune the final classifier layer")
_SCHEDULE = OptionSpec(
    "schedule",
    "object",
    None,
    help='{"steps": N, "finetune_epochs": E}: gradual pruning (Zhu & Gupta 2017); needs a dataset',
)
_TRAIN = OptionSpec("train", "object", None, help="training-loop options (optimizer, lr, epochs, ...)")
_SKIP = OptionSpec("skip_layers", "str_list", [], help="glob patterns of module names left in float")
_KEEP_ENDS = OptionSpec("keep_first_last_float", "bool", False, help="leave the first and last layers in float")

_PRUNE_COMMON = (_AMOUNT, _LAYERS, _KEEP_CLASSIFIER, _SCHEDULE, _TRAIN)
# A fidelity bar for int8: quantize everything, then keep the most harmful layers in float until it holds.
_BAR = (
    OptionSpec(
        "min_sqnr_db",
        "float",
        None,
        0.0,
        200.0,
        help="mixed precision: keep the fewest, most harmful layers in float until the whole model's "
        "SQNR against the float outputs is at least this",
    ),
    OptionSpec(
        "max_accuracy_drop",
        "float",
        None,
        0.0,
        1.0,
        help="mixed precision: the same for the top-1 drop; needs an eval dataset with labels",
    ),
)

# Outlier-aware int8 for transformers (worker/compression/smoothquant.py).
_OUTLIERS = (
    OptionSpec(
        "smoothquant",
        "bool",
        False,
        help="migrate activation outliers into the weights before quantizing (SmoothQuant, "
        "Xiao et al. 2023); measures activation ranges on the dataset, so needs a dataset_id",
    ),
    OptionSpec(
        "alpha", "float", 0.5, 0.0, 1.0, help="smoothquant migration strength: s = max|X|^alpha / max|W|^(1-alpha)"
    ),
    OptionSpec(
        "calibration_batches",
        "int",
        16,
        1,
        10_000,
        help="smoothquant: batches of 32 samples whose activation ranges are measured",
    ),
    OptionSpec(
        "quantize_embeddings",
        "bool",
        False,
        help="also store nn.Embedding tables as int8 (weight-only, one scale per row)",
    ),
)

# CNN repair for static int8, after batch-norm folding (worker/compression/quantization/repair.py).
_CNN_REPAIR = (
    OptionSpec(
        "cross_layer_equalization",
        "str",
        "auto",
        choices=("auto", "on", "off"),
        help="rescale consecutive conv/linear pairs joined through ReLU or pooling so their per-channel "
        "weight ranges match (Nagel et al. 2019); auto: kept only when it raises the SQNR on held-out "
        "calibration samples",
    ),
    OptionSpec(
        "bias_correction",
        "str",
        "auto",
        choices=("auto", "on", "off"),
        help="subtract from each bias the mean output shift its int8 weights cause on the calibration "
        "data; auto: kept only when it raises the SQNR on held-out calibration samples",
    ),
)

SCHEMES: tuple[SchemeSpec, ...] = (
    SchemeSpec(
        "prune",
        "l1_unstructured",
        "zero the smallest-magnitude weights of each layer",
        ("cpu", "cuda"),
        options=_PRUNE_COMMON,
        library="torch.nn.utils.prune",
    ),
    SchemeSpec(
        "prune",
        "random_unstructured",
        "zero random weights of each layer",
        ("cpu", "cuda"),
        options=_PRUNE_COMMON,
        library="torch.nn.utils.prune",
    ),
    SchemeSpec(
        "prune",
        "global_l1_unstructured",
        "one magnitude threshold across all chosen layers",
        ("cpu", "cuda"),
        options=_PRUNE_COMMON,
        library="torch.nn.utils.prune",
    ),
    SchemeSpec(
        "prune",
        "ln_structured",
        "remove whole output channels / neurons by their Ln norm; shapes shrink",
        ("cpu", "cuda"),
        input_formats=EAGER_FORMATS,
        options=_PRUNE_COMMON + (OptionSpec("norm", "float", 2.0, 1.0, 100.0),),
        library="torch-pruning (dependency graph)",
    ),
    SchemeSpec(
        "prune",
        "nm_semi_structured",
        "N of every M weights along the input dimension (2:4)",
        ("cpu", "cuda"),
        options=(OptionSpec("n", "int", 2, 1, 16), OptionSpec("m", "int", 4, 2, 32), _LAYERS, _KEEP_CLASSIFIER, _TRAIN),
        library="torch (to_sparse_semi_structured on CUDA)",
    ),
    SchemeSpec(
        "quantize",
        "dynamic_int8",
        "int8 weights, activations quantized on the fly (Linear, LSTM, GRU)",
        ("cpu",),
        quantizes=True,
        options=(_SKIP, _KEEP_ENDS, *_BAR, *_OUTLIERS),
        library="torch.ao.quantization.quantize_dynamic / quantize_dynamic_jit",
    ),
    SchemeSpec(
        "quantize",
        "static_int8",
        "int8 weights and activations, calibrated on the dataset",
        ("cpu",),
        input_formats=EAGER_FORMATS,
        needs_dataset=True,
        quantizes=True,
        options=(_SKIP, _KEEP_ENDS, OptionSpec("calibration_batches", "int", 16, 1, 10_000), *_BAR, *_CNN_REPAIR),
        library="torchao PT2E (X86InductorQuantizer) / torch.ao FX",
    ),
    SchemeSpec(
        "quantize",
        "qat_int8",
        "quantization-aware training: fake-quantized fine-tuning on the dataset, then the static_int8 artifact",
        ("cpu",),
        input_formats=EAGER_FORMATS,
        needs_dataset=True,
        needs_labels=True,
        quantizes=True,
        options=(
            _SKIP,
            _KEEP_ENDS,
            OptionSpec("calibration_batches", "int", 16, 1, 10_000),
            OptionSpec(
                "train", "object", None, help="training-loop options for the fine-tune (default epochs 3, lr 1e-4)"
            ),
        ),
        library="torchao PT2E QAT (prepare_qat_pt2e) / torch.ao FX convert",
    ),
    SchemeSpec(
        "quantize",
        "fp16",
        "half-precision weights and activations",
        ("cpu", "cuda"),
        quantizes=True,
        options=(_SKIP,),
        library="torch",
    ),
    SchemeSpec(
        "quantize",
        "bf16",
        "bfloat16 weights and activations",
        ("cpu", "cuda"),
        quantizes=True,
        options=(_SKIP,),
        library="torch",
    ),
    SchemeSpec(
        "quantize",
        "int8_weight_only",
        "torchao int8 weight-only",
        ("cuda",),
        input_formats=EAGER_FORMATS,
        quantizes=True,
        options=(_SKIP,),
        library="torchao",
    ),
    SchemeSpec(
        "quantize",
        "int8_dynamic",
        "torchao int8 dynamic activations, int8 weights",
        ("cuda",),
        input_formats=EAGER_FORMATS,
        quantizes=True,
        options=(_SKIP,),
        library="torchao",
    ),
    SchemeSpec(
        "quantize",
        "int4_weight_only",
        "torchao int4 weight-only (CUDA kernels)",
        ("cuda",),
        input_formats=EAGER_FORMATS,
        quantizes=True,
        options=(_SKIP, OptionSpec("group_size", "int", 128, 32, 256)),
        library="torchao",
    ),
    SchemeSpec(
        "quantize",
        "float8",
        "torchao float8 dynamic (compute capability >= 8.9)",
        ("cuda",),
        input_formats=EAGER_FORMATS,
        quantizes=True,
        min_compute_capability=8.9,
        options=(_SKIP,),
        library="torchao",
    ),
    SchemeSpec(
        "distill",
        "hinton",
        "knowledge distillation into a smaller student (Hinton et al. 2015)",
        ("cpu", "cuda"),
        needs_dataset=True,
        options=(
            OptionSpec("student", "str_or_object", "auto", help='"auto", {"architecture": {...}} or {"model_id": ...}'),
            OptionSpec("width_multiplier", "float", 0.25, 0.01, 1.0),
            OptionSpec("temperature", "float", 2.0, 0.1, 100.0),
            OptionSpec("alpha", "float", 0.5, 0.0, 1.0),
            OptionSpec(
                "baseline",
                "bool",
                False,
                help="also train the student on labels alone (always done when the training "
                "and evaluation data have labels: the better of the two is delivered)",
            ),
            OptionSpec(
                "sweep",
                "bool",
                True,
                help="with labels, also try a few (temperature, alpha) settings and deliver "
                "the best run, the baseline included",
            ),
            OptionSpec(
                "sweep_time_budget_s",
                "float",
                120.0,
                1.0,
                86400.0,
                help="no further sweep run starts once one more would pass this budget",
            ),
            OptionSpec(
                "feature_layers",
                "object",
                None,
                help='{"teacher_layer": "student_layer"} pairs for feature distillation',
            ),
            OptionSpec(
                "transfer_augmentation",
                "str",
                "none",
                choices=("mixup", "noise", "none"),
                help="extra teacher-labelled views of each batch (the teacher sees the same "
                "view as the student); float inputs only",
            ),
            _TRAIN,
        ),
        library="torch",
    ),
)

SCHEMES += (
    SchemeSpec(
        "search",
        "accuracy_aware",
        "the smallest (or fastest) model that meets an accuracy or fidelity bar, over recipes and amounts",
        ("cpu",),
        options=(
            OptionSpec(
                "max_accuracy_drop",
                "float",
                None,
                0.0,
                1.0,
                help="absolute top-1 drop allowed; needs an eval dataset with labels",
            ),
            OptionSpec("min_sqnr_db", "float", None, 0.0, 200.0, help="fidelity bar; no labels needed"),
            OptionSpec("objective", "str", "size", choices=("size", "latency")),
            OptionSpec(
                "candidates",
                "object",
                None,
                help='{"recipes": [[stage, ...], ...], "amount": {"min": 0.3, "max": 0.95}}',
            ),
            OptionSpec("max_trials", "int", 12, 1, 200),
            OptionSpec("time_budget_s", "float", 1800.0, 1.0, 86400.0),
            _TRAIN,
        ),
        library="ModelPress search over the other methods",
    ),
)

SCHEMES += (
    SchemeSpec(
        "encode",
        "codebook",
        "k-means weight sharing over the nonzero weights (Han et al. 2016); an eager model is delivered "
        "in the deep_compression container (fp16 codebooks, Huffman-coded codes and relative index; "
        "modelpress.deep_compression_format loads it), or as TorchScript with output_format torchscript; "
        "run it after pruning",
        ("cpu", "cuda"),
        input_formats=EAGER_FORMATS,
        quantizes=True,
        options=(
            OptionSpec("bits", "int", 5, 2, 8, help="code bits per weight: 2^bits shared values per layer"),
            _LAYERS,
            OptionSpec(
                "prune_classifier",
                "bool",
                True,
                help="also encode the final classifier layer (Han et al. encode every layer)",
            ),
            OptionSpec(
                "min_sparsity", "float", 0.0, 0.0, 1.0, help="Linear layers with fewer zeros than this stay in float"
            ),
            OptionSpec(
                "finetune_epochs",
                "int",
                0,
                0,
                100,
                help="fine-tune the shared centroids and biases on the labelled training set "
                "(Han et al.); kept only when training accuracy does not drop",
            ),
        ),
        library="torch (k-means, centroid fine-tuning), numpy (canonical Huffman); "
        "TorchScript CodebookLinear for output_format torchscript",
    ),
)

SCHEMES += (
    SchemeSpec(
        "analyze",
        "sensitivity",
        "per-layer table: the whole model's SQNR (and top-1 drop with labels) with only that layer "
        "quantized, most harmful first, plus a verified skip_layers for a bar; delivers the model unchanged",
        ("cpu",),
        options=(
            OptionSpec(
                "quantization",
                "str",
                "dynamic_int8",
                choices=("dynamic_int8", "static_int8"),
                help="the quantize scheme probed (static_int8 needs an eager or exported model and a dataset)",
            ),
            OptionSpec("samples", "int", 64, 1, 4096, help="probe-set size (from the eval, else training set)"),
            OptionSpec(
                "pruning",
                "bool",
                False,
                help="also tabulate, per Linear / Conv layer, the whole model's fidelity with only that layer "
                "pruned (unstructured L1) at 30%, 50% and 70%",
            ),
            OptionSpec("calibration_batches", "int", 16, 1, 10_000),
            OptionSpec(
                "min_sqnr_db", "float", None, 0.0, 200.0, help="suggest the skip_layers that meet this SQNR (verified)"
            ),
            OptionSpec(
                "max_accuracy_drop",
                "float",
                None,
                0.0,
                1.0,
                help="suggest the skip_layers that meet this top-1 drop (verified; needs labels)",
            ),
        ),
        library="ModelPress (torch.ao.quantization backends, one layer at a time)",
    ),
)

# Presets expand into recipes (lists of stages); GET /v1/methods lists them.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu-int8": {
        "summary": "dynamic int8 quantization for CPU serving",
        "stages": [{"method": "quantize", "scheme": "dynamic_int8"}],
    },
    "deep-compression": {
        "summary": "gradual magnitude pruning with fine-tuning, 5-bit k-means weight sharing with centroid "
        "fine-tuning, and Huffman-coded codes and relative index in the weights-only "
        "deep_compression container (Han et al. 2016)",
        "stages": [
            {
                "method": "prune",
                "scheme": "global_l1_unstructured",
                "amount": 0.92,
                "prune_classifier": True,
                "schedule": {"steps": 5, "finetune_epochs": 5},
            },
            {"method": "encode", "scheme": "codebook", "bits": 5, "finetune_epochs": 3},
        ],
    },
    "distill-small": {
        "summary": "distil into a student a quarter of the teacher's width",
        "stages": [{"method": "distill", "scheme": "hinton", "student": "auto", "width_multiplier": 0.25}],
    },
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
