"""The encode method's scheme (worker/compression/codebook.py, deep_compression.py)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from modelpress.configs.base import EAGER_FORMATS, Device, Layers, StageConfig


class CodebookConfig(StageConfig):
    method: Literal["encode"] = "encode"
    scheme: Literal["codebook"] = "codebook"
    summary: ClassVar[str] = (
        "k-means weight sharing over the nonzero weights (Han et al. 2016); an eager model is delivered "
        "in the deep_compression container (fp16 codebooks, Huffman-coded codes and relative index; "
        "modelpress.deep_compression_format loads it), or as TorchScript with output_format torchscript; "
        "run it after pruning"
    )
    devices: ClassVar[tuple[Device, ...]] = ("cpu", "cuda")
    input_formats: ClassVar[tuple[str, ...]] = EAGER_FORMATS
    quantizes: ClassVar[bool] = True
    library: ClassVar[str] = (
        "torch (k-means, centroid fine-tuning), numpy (canonical Huffman); "
        "TorchScript CodebookLinear for output_format torchscript"
    )

    bits: Annotated[int, Field(ge=2, le=8, description="code bits per weight: 2^bits shared values per layer")] = 5
    layers: Layers = None
    prune_classifier: Annotated[
        bool, Field(description="also encode the final classifier layer (Han et al. encode every layer)")
    ] = True
    min_sparsity: Annotated[
        float, Field(ge=0.0, le=1.0, description="Linear layers with fewer zeros than this stay in float")
    ] = 0.0
    finetune_epochs: Annotated[
        int,
        Field(
            ge=0,
            le=100,
            description="fine-tune the shared centroids and biases on the labelled training set "
            "(Han et al.); kept only when training accuracy does not drop",
        ),
    ] = 0


ENCODE_CONFIGS: tuple[type[StageConfig], ...] = (CodebookConfig,)
