"""The prune method's schemes (worker/compression/pruning/)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from modelpress.configs.base import (
    EAGER_FORMATS,
    Amount,
    Device,
    Layers,
    PruneClassifier,
    Schedule,
    StageConfig,
    Train,
)


class _PruneConfig(StageConfig):
    method: Literal["prune"] = "prune"
    devices: ClassVar[tuple[Device, ...]] = ("cpu", "cuda")
    library: ClassVar[str] = "torch.nn.utils.prune"


class _AmountPruneConfig(_PruneConfig):
    amount: Amount = 0.5
    layers: Layers = None
    prune_classifier: PruneClassifier = False
    schedule: Schedule = None
    train: Train = None


class L1UnstructuredConfig(_AmountPruneConfig):
    scheme: Literal["l1_unstructured"] = "l1_unstructured"
    summary: ClassVar[str] = "zero the smallest-magnitude weights of each layer"


class RandomUnstructuredConfig(_AmountPruneConfig):
    scheme: Literal["random_unstructured"] = "random_unstructured"
    summary: ClassVar[str] = "zero random weights of each layer"


class GlobalL1UnstructuredConfig(_AmountPruneConfig):
    scheme: Literal["global_l1_unstructured"] = "global_l1_unstructured"
    summary: ClassVar[str] = "one magnitude threshold across all chosen layers"


class LnStructuredConfig(_AmountPruneConfig):
    scheme: Literal["ln_structured"] = "ln_structured"
    summary: ClassVar[str] = (
        "remove whole output channels / neurons by their Ln norm (transformers: attention heads and MLP channels);"
        " shapes shrink"
    )
    input_formats: ClassVar[tuple[str, ...]] = EAGER_FORMATS
    library: ClassVar[str] = (
        "torch-pruning (dependency graph); transformers: heads / MLP channels on the exported graph"
    )

    norm: Annotated[float, Field(ge=1.0, le=100.0, description="the n of the Ln norm that ranks channels")] = 2.0
    heads: Annotated[
        float,
        Field(
            ge=0.0,
            lt=1.0,
            description="transformers: fraction of each attention's heads removed (amount: of each MLP's channels)",
        ),
    ] = 0.0


class NmSemiStructuredConfig(_PruneConfig):
    scheme: Literal["nm_semi_structured"] = "nm_semi_structured"
    summary: ClassVar[str] = "N of every M weights along the input dimension (2:4)"
    library: ClassVar[str] = "torch (to_sparse_semi_structured on CUDA)"

    n: Annotated[int, Field(ge=1, le=16, description="weights kept in every group of m")] = 2
    m: Annotated[int, Field(ge=2, le=32, description="group size along the input dimension")] = 4
    layers: Layers = None
    prune_classifier: PruneClassifier = False
    train: Train = None


PRUNE_CONFIGS: tuple[type[StageConfig], ...] = (
    L1UnstructuredConfig,
    RandomUnstructuredConfig,
    GlobalL1UnstructuredConfig,
    LnStructuredConfig,
    NmSemiStructuredConfig,
)
