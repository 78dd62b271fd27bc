"""The distill method's scheme (worker/compression/distillation.py)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from modelpress.configs.base import Device, StageConfig, Train


class HintonConfig(StageConfig):
    method: Literal["distill"] = "distill"
    scheme: Literal["hinton"] = "hinton"
    summary: ClassVar[str] = "knowledge distillation into a smaller student (Hinton et al. 2015)"
    devices: ClassVar[tuple[Device, ...]] = ("cpu", "cuda")
    needs_dataset: ClassVar[bool] = True
    library: ClassVar[str] = "torch"

    student: Annotated[
        Annotated[str, Field(max_length=256)] | dict[str, Any],
        Field(description='"auto", {"architecture": {...}} or {"model_id": ...}'),
    ] = "auto"
    width_multiplier: Annotated[
        float, Field(ge=0.01, le=1.0, description='student "auto": its width as a fraction of the teacher\'s')
    ] = 0.25
    temperature: Annotated[float, Field(ge=0.1, le=100.0, description="softens both models' outputs")] = 2.0
    alpha: Annotated[float, Field(ge=0.0, le=1.0, description="weight of the teacher's soft targets in the loss")] = 0.5
    baseline: Annotated[
        bool,
        Field(
            description="also train the student on labels alone (always done when the training "
            "and evaluation data have labels: the better of the two is delivered)"
        ),
    ] = False
    sweep: Annotated[
        bool,
        Field(
            description="with labels, also try a few (temperature, alpha) settings and deliver "
            "the best run, the baseline included"
        ),
    ] = True
    sweep_time_budget_s: Annotated[
        float,
        Field(ge=1.0, le=86400.0, description="no further sweep run starts once one more would pass this budget"),
    ] = 120.0
    feature_layers: Annotated[
        dict[str, Any] | None,
        Field(description='{"teacher_layer": "student_layer"} pairs for feature distillation'),
    ] = None
    transfer_augmentation: Annotated[
        Literal["mixup", "noise", "none"],
        Field(
            description="extra teacher-labelled views of each batch (the teacher sees the same "
            "view as the student); float inputs only"
        ),
    ] = "none"
    train: Train = None


DISTILL_CONFIGS: tuple[type[StageConfig], ...] = (HintonConfig,)
