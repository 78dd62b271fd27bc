"""Outlier-aware dynamic int8: SmoothQuant on planted activation outliers, int8 embeddings; measured on artifacts."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelpress.catalog import JobFacts, SpecError, validate_stages
from tests.engine.transformer_models import tiny_bert, token_ids
from worker.compression.base import Dataset, StageContext
from worker.compression.quantization import run_stage, sqnr_db
from worker.compression.smoothquant import smooth_linears

DYNAMIC = {"skip_layers": [], "keep_first_last_float": False, "calibration_batches": 2}
OUTLIER_CHANNELS = 4


class PreNormBlock(nn.Module):
    """A pre-LayerNorm gated feed-forward block: the LayerNorm output feeds only Linears (foldable)."""

    def __init__(self, vocab: int = 500, hidden: int = 128) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.up = nn.Linear(hidden, 4 * hidden)
        self.gate = nn.Linear(hidden, 4 * hidden)
        self.down = nn.Linear(4 * hidden, hidden)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids)
        h = self.norm(x)
        return x + self.down(F.gelu(self.up(h)) * self.gate(h))


def plant_outliers(model: nn.Module) -> nn.Module:
    """Scale a few hidden channels of every LayerNorm's output by 50 (the outlier dimensions of real BERTs)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight[:OUTLIER_CHANNELS] *= 50
                module.bias[:OUTLIER_CHANNELS] *= 50
    return model.eval()


def artifact(model: nn.Module, example: torch.Tensor) -> tuple[torch.jit.ScriptModule, int]:
    """Trace and save as the worker does (io.save_artifact), load back; the loaded module and its file size."""
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(model, example, check_trace=False), buffer)
    size = len(buffer.getvalue())
    buffer.seek(0)
    return torch.jit.load(buffer), size


def context(example: torch.Tensor) -> StageContext:
    return StageContext("eager", example, train_data=Dataset(token_ids(64, seed=1)))


@pytest.mark.parametrize("build", [lambda: tiny_bert(outliers=False), PreNormBlock], ids=["post_ln_bert", "pre_ln"])
def test_smoothquant_raises_int8_sqnr_on_planted_outliers(build) -> None:
    torch.manual_seed(0)
    model = plant_outliers(build())
    test_ids = token_ids(32, seed=2)
    with torch.no_grad():
        reference = model(test_ids)
    ctx = context(test_ids[:4])
    plain = run_stage(model, "dynamic_int8", DYNAMIC, ctx)
    smoothed = run_stage(model, "dynamic_int8", {**DYNAMIC, "smoothquant": True, "alpha": 0.5}, ctx)
    plain_artifact, _ = artifact(plain.model, test_ids[:4])
    smooth_artifact, _ = artifact(smoothed.model, test_ids[:4])
    with torch.no_grad():
        plain_sqnr = sqnr_db(reference, plain_artifact(test_ids))
        smooth_sqnr = sqnr_db(reference, smooth_artifact(test_ids))
    assert smooth_sqnr >= plain_sqnr + 3.0, (plain_sqnr, smooth_sqnr)
    report = smoothed.info["smoothquant"]
    assert report["smoothed_layers"] == len(smoothed.info["quantized_layers"])
    assert report["outlier_ratio_after"] < report["outlier_ratio_before"] / 3
    assert smoothed.info["quantized_layers"] == plain.info["quantized_layers"]


def test_smoothquant_keeps_the_float_model_equal_and_folds_into_pre_layer_norms() -> None:
    torch.manual_seed(0)
    model = plant_outliers(PreNormBlock())
    ids = token_ids(16, seed=3)
    smoothed = smooth_linears(model, [token_ids(32, seed=1)], 0.5, ["up", "gate", "down"], context(ids[:4]))
    # up and gate read only the LayerNorm: 1/s went into it; down reads a GELU product: an input hook
    assert smoothed.info["folded_into_layer_norm"] == ["gate", "up"]
    assert smoothed.info["input_hooks"] == ["down"]
    assert not torch.equal(smoothed.model.norm.weight, model.norm.weight)
    assert len(smoothed.model.up._forward_pre_hooks) == 0 and len(smoothed.model.down._forward_pre_hooks) == 1
    with torch.no_grad():
        assert sqnr_db(model(ids), smoothed.model(ids)) > 80  # the same function up to float rounding


def test_post_layer_norm_residual_is_not_folded() -> None:
    # in post-LN BERT the LayerNorm output also feeds the residual, so dividing it by s would change the model
    model = plant_outliers(tiny_bert(outliers=False))
    ids = token_ids(8, seed=3)
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    smoothed = smooth_linears(model, [token_ids(32, seed=1)], 0.5, names, context(ids[:4]))
    assert smoothed.info["folded_into_layer_norm"] == []
    with torch.no_grad():
        assert sqnr_db(model(ids), smoothed.model(ids)) > 80


def test_quantize_embeddings_shrinks_a_transformer_file_close_to_4x() -> None:
    model = tiny_bert()
    test_ids = token_ids(16, seed=2)
    _, float_size = artifact(model, test_ids[:4])
    ctx = context(test_ids[:4])
    linears_only = run_stage(model, "dynamic_int8", DYNAMIC, ctx)
    with_tables = run_stage(model, "dynamic_int8", {**DYNAMIC, "quantize_embeddings": True}, ctx)
    assert with_tables.info["quantized_embeddings"] == ["tokens", "positions"]
    loaded, size = artifact(with_tables.model, test_ids[:4])
    _, linears_only_size = artifact(linears_only.model, test_ids[:4])
    assert size < 0.35 * float_size < linears_only_size
    with torch.no_grad():
        assert sqnr_db(model(test_ids), loaded(test_ids)) > 15


def test_catalog_rejects_smoothquant_it_cannot_run() -> None:
    with pytest.raises(SpecError, match="needs a dataset_id"):
        validate_stages([{"method": "quantize", "scheme": "dynamic_int8", "smoothquant": True}], JobFacts("state_dict"))
    with pytest.raises(SpecError, match="not TorchScript"):
        validate_stages(
            [{"method": "quantize", "scheme": "dynamic_int8", "quantize_embeddings": True}],
            JobFacts("torchscript", has_dataset=True),
        )
    with pytest.raises(SpecError, match="alpha must be <= 1"):
        validate_stages(
            [{"method": "quantize", "scheme": "dynamic_int8", "smoothquant": True, "alpha": 1.5}],
            JobFacts("state_dict", has_dataset=True),
        )
