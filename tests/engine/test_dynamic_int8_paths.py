"""dynamic_int8 off torch.ao: the lifter on attention models, the path selection, and the torchao path."""

from __future__ import annotations

import io

import torch

from tests import zoo
from worker.compression.base import StageContext
from worker.compression.quantization import run_stage, sqnr_db

DYNAMIC = {"skip_layers": [], "keep_first_last_float": False}


def test_dynamic_int8_on_an_exported_vit_lifts_attention_projections() -> None:
    """Regression: the lifter put MultiheadAttention's in_proj layer on `attn` itself, so the module
    swap dropped attn.out_proj ("'Linear' object has no attribute 'out_proj'")."""
    entry = zoo.build("vit")
    (images,) = entry.inputs
    batch = torch.export.Dim("batch", min=1, max=64)
    graph = torch.export.export(entry.model, (images,), dynamic_shapes=({0: batch},)).module()

    result = run_stage(graph, "dynamic_int8", DYNAMIC, StageContext("graph", images))

    quantized = set(result.info["quantized_layers"])
    assert {"blocks.0.attn.in_proj", "blocks.0.attn.out_proj", "blocks.1.attn.in_proj", "head"} <= quantized
    # what the user downloads for this backend: the traced module, loaded back
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.trace(result.model, images), buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    # the example's batch: tracing bakes the class token's expand to it
    other = torch.randn(len(images), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert sqnr_db(entry.model(other), loaded(other)) >= 20
    # no float copy of a lifted weight is left beside its int8 layer
    assert not [name for name in result.model.state_dict() if name.endswith("in_proj_weight")]
