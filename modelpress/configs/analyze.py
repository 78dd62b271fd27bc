"""The analyze method's scheme (worker/compression/sensitivity.py)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from modelpress.configs.base import CalibrationBatches, MaxAccuracyDrop, MinSqnrDb, StageConfig


class SensitivityConfig(StageConfig):
    method: Literal["analyze"] = "analyze"
    scheme: Literal["sensitivity"] = "sensitivity"
    summary: ClassVar[str] = (
        "per-layer table: the whole model's SQNR (and top-1 drop with labels) with only that layer "
        "quantized, most harmful first, plus a verified skip_layers for a bar; delivers the model unchanged"
    )
    library: ClassVar[str] = "ModelPress (torch.ao.quantization backends, one layer at a time)"

    quantization: Annotated[
        Literal["dynamic_int8", "static_int8"],
        Field(description="the quantize scheme probed (static_int8 needs an eager or exported model and a dataset)"),
    ] = "dynamic_int8"
    samples: Annotated[int, Field(ge=1, le=4096, description="probe-set size (from the eval, else training set)")] = 64
    calibration_batches: Annotated[
        CalibrationBatches, Field(description="static_int8: batches of 32 samples for calibration")
    ] = 16
    min_sqnr_db: Annotated[
        MinSqnrDb | None, Field(description="suggest the skip_layers that meet this SQNR (verified)")
    ] = None
    max_accuracy_drop: Annotated[
        MaxAccuracyDrop | None,
        Field(description="suggest the skip_layers that meet this top-1 drop (verified; needs labels)"),
    ] = None
    pruning: Annotated[
        bool,
        Field(
            description="also tabulate, per Linear / Conv layer, the whole model's fidelity with only that layer "
            "pruned (unstructured L1) at 30%, 50% and 70%"
        ),
    ] = False


ANALYZE_CONFIGS: tuple[type[StageConfig], ...] = (SensitivityConfig,)
