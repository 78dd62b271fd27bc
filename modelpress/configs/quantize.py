"""The quantize method's schemes (worker/compression/quantization/)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from modelpress.configs.base import (
    EAGER_FORMATS,
    CalibrationBatches,
    Device,
    KeepEnds,
    MaxAccuracyDrop,
    MinSqnrDb,
    SkipLayers,
    StageConfig,
    Train,
)

# a fidelity bar for int8: quantize everything, then keep the most harmful layers in float until it holds
MixedPrecisionSqnr = Annotated[
    MinSqnrDb | None,
    Field(
        description="mixed precision: keep the fewest, most harmful layers in float until the whole model's "
        "SQNR against the float outputs is at least this"
    ),
]
MixedPrecisionDrop = Annotated[
    MaxAccuracyDrop | None,
    Field(description="mixed precision: the same for the top-1 drop; needs an eval dataset with labels"),
]


Calibration = Annotated[
    CalibrationBatches, Field(description="batches of 32 samples whose activation ranges are measured")
]
# a CNN repair after batch-norm folding (worker/compression/quantization/repair.py)
RepairMode = Literal["auto", "on", "off"]
_AUTO_REPAIR = "; auto: kept only when it raises the SQNR on held-out calibration samples"


class _QuantizeConfig(StageConfig):
    method: Literal["quantize"] = "quantize"
    quantizes: ClassVar[bool] = True

    skip_layers: SkipLayers = []


class DynamicInt8Config(_QuantizeConfig):
    scheme: Literal["dynamic_int8"] = "dynamic_int8"
    summary: ClassVar[str] = "int8 weights, activations quantized on the fly (Linear, LSTM, GRU)"
    library: ClassVar[str] = "torch.ao.quantization.quantize_dynamic / quantize_dynamic_jit"

    keep_first_last_float: KeepEnds = False
    # a fidelity bar for int8: quantize everything, then keep the most harmful layers in float until it holds
    min_sqnr_db: MixedPrecisionSqnr = None
    max_accuracy_drop: MixedPrecisionDrop = None
    # outlier-aware int8 for transformers (worker/compression/smoothquant.py)
    smoothquant: Annotated[
        bool,
        Field(
            description="migrate activation outliers into the weights before quantizing (SmoothQuant, "
            "Xiao et al. 2023); measures activation ranges on the dataset, so needs a dataset_id"
        ),
    ] = False
    alpha: Annotated[
        float,
        Field(ge=0.0, le=1.0, description="smoothquant migration strength: s = max|X|^alpha / max|W|^(1-alpha)"),
    ] = 0.5
    calibration_batches: Annotated[
        CalibrationBatches, Field(description="smoothquant: batches of 32 samples whose activation ranges are measured")
    ] = 16
    quantize_embeddings: Annotated[
        bool, Field(description="also store nn.Embedding tables as int8 (weight-only, one scale per row)")
    ] = False


class StaticInt8Config(_QuantizeConfig):
    scheme: Literal["static_int8"] = "static_int8"
    summary: ClassVar[str] = "int8 weights and activations, calibrated on the dataset"
    input_formats: ClassVar[tuple[str, ...]] = EAGER_FORMATS
    needs_dataset: ClassVar[bool] = True
    library: ClassVar[str] = "torchao PT2E (X86InductorQuantizer) / torch.ao FX"

    keep_first_last_float: KeepEnds = False
    calibration_batches: Calibration = 16
    min_sqnr_db: MixedPrecisionSqnr = None
    max_accuracy_drop: MixedPrecisionDrop = None
    # CNN repair after batch-norm folding (worker/compression/quantization/repair.py)
    cross_layer_equalization: Annotated[
        RepairMode,
        Field(
            description="rescale consecutive conv/linear pairs joined through ReLU or pooling so their per-channel "
            "weight ranges match (Nagel et al. 2019)" + _AUTO_REPAIR
        ),
    ] = "auto"
    bias_correction: Annotated[
        RepairMode,
        Field(
            description="subtract from each bias the mean output shift its int8 weights cause on the calibration "
            "data" + _AUTO_REPAIR
        ),
    ] = "auto"


class QatInt8Config(_QuantizeConfig):
    scheme: Literal["qat_int8"] = "qat_int8"
    summary: ClassVar[str] = (
        "quantization-aware training: fake-quantized fine-tuning on the dataset, then the static_int8 artifact"
    )
    input_formats: ClassVar[tuple[str, ...]] = EAGER_FORMATS
    needs_dataset: ClassVar[bool] = True
    needs_labels: ClassVar[bool] = True
    library: ClassVar[str] = "torchao PT2E QAT (prepare_qat_pt2e) / torch.ao FX convert"

    keep_first_last_float: KeepEnds = False
    calibration_batches: Calibration = 16
    train: Annotated[
        Train, Field(description="training-loop options for the fine-tune (default epochs 3, lr 1e-4)")
    ] = None


class Fp16Config(_QuantizeConfig):
    scheme: Literal["fp16"] = "fp16"
    summary: ClassVar[str] = "half-precision weights and activations"
    devices: ClassVar[tuple[Device, ...]] = ("cpu", "cuda")
    library: ClassVar[str] = "torch"


class Bf16Config(_QuantizeConfig):
    scheme: Literal["bf16"] = "bf16"
    summary: ClassVar[str] = "bfloat16 weights and activations"
    devices: ClassVar[tuple[Device, ...]] = ("cpu", "cuda")
    library: ClassVar[str] = "torch"


class _TorchaoConfig(_QuantizeConfig):
    devices: ClassVar[tuple[Device, ...]] = ("cuda",)
    input_formats: ClassVar[tuple[str, ...]] = EAGER_FORMATS
    library: ClassVar[str] = "torchao"


class Int8WeightOnlyConfig(_TorchaoConfig):
    scheme: Literal["int8_weight_only"] = "int8_weight_only"
    summary: ClassVar[str] = "torchao int8 weight-only"


class Int8DynamicConfig(_TorchaoConfig):
    scheme: Literal["int8_dynamic"] = "int8_dynamic"
    summary: ClassVar[str] = "torchao int8 dynamic activations, int8 weights"


class Int4WeightOnlyConfig(_TorchaoConfig):
    scheme: Literal["int4_weight_only"] = "int4_weight_only"
    summary: ClassVar[str] = "torchao int4 weight-only (CUDA kernels)"

    group_size: Annotated[int, Field(ge=32, le=256, description="weights sharing one scale")] = 128


class Float8Config(_TorchaoConfig):
    scheme: Literal["float8"] = "float8"
    summary: ClassVar[str] = "torchao float8 dynamic (compute capability >= 8.9)"
    min_compute_capability: ClassVar[float | None] = 8.9


QUANTIZE_CONFIGS: tuple[type[StageConfig], ...] = (
    DynamicInt8Config,
    StaticInt8Config,
    QatInt8Config,
    Fp16Config,
    Bf16Config,
    Int8WeightOnlyConfig,
    Int8DynamicConfig,
    Int4WeightOnlyConfig,
    Float8Config,
)
