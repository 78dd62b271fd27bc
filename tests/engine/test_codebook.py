"""Encode stage, scheme codebook: exact weight sharing, sparse storage, a TorchScript artifact stock torch runs."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from modelpress.catalog import JobFacts, SpecError, expand_preset, validate_stages
from worker.compression.base import EngineError, StageContext
from worker.compression.codebook import encode_layer, kmeans_share, run_stage
from worker.compression.pruning import magnitude_masks

pytestmark = pytest.mark.usefixtures("one_thread")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _pruned(amount: float = 0.9) -> MLP:
    torch.manual_seed(0)
    model = MLP().eval()
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for weight, mask in zip(weights, magnitude_masks(weights, amount, global_scope=False)):
            weight.mul_(mask)
    return model


def _ctx() -> StageContext:
    # these tests cover the TorchScript artifact, which an eager model gets on output_format torchscript
    return StageContext(
        kind="eager",
        example_input=torch.randn(8, 64, generator=torch.Generator().manual_seed(1)),
        output_format="torchscript",
    )


def _options(**overrides: object) -> dict:
    return {"bits": 5, "layers": None, "prune_classifier": True, "min_sparsity": 0.0, **overrides}


@pytest.mark.parametrize("bits", [2, 5, 8])
def test_encoding_is_exact_zeros_stay_zero_and_codebook_has_2_to_bits_values(bits: int) -> None:
    layer = _pruned().net[2]
    module, shared, figures = encode_layer(layer.weight, layer.bias, bits)
    weight = layer.weight.detach()
    assert torch.equal(module.weight, shared)  # decoded == k-means-shared weights, bit for bit
    assert torch.equal(shared == 0, weight == 0)  # pruned zeros stay zero, nonzeros stay nonzero
    codebook = module.floats[: module.header[2]]
    assert codebook.numel() == 2**bits == figures["clusters"]
    assert set(shared[weight != 0].unique().tolist()) <= set(codebook.tolist())
    assert torch.equal(module.bias, layer.bias.detach())
    # the nearest centroid: no nonzero weight is closer to another codebook entry than to its own
    nonzero = weight[weight != 0]
    nearest = codebook[(nonzero.unsqueeze(1) - codebook).abs().argmin(1)]
    assert torch.allclose((nonzero - nearest).abs(), (nonzero - shared[weight != 0]).abs())
    if bits >= 5:
        assert figures["sqnr_db"] > 20


def test_kmeans_linear_init_and_index_kinds_round_trip() -> None:
    codebook, codes = kmeans_share(torch.tensor([-1.0, -0.9, 0.5, 0.6, 2.0]), 3)
    assert codebook.tolist() == pytest.approx([-0.95, 0.55, 2.0])
    assert codes.tolist() == [0, 0, 1, 1, 2]
    # long gaps need filler entries in the relative index; a dense layer prefers the bitmask
    sparse = torch.zeros(50, 600)
    sparse[0, 0], sparse[49, 599], sparse[20, 7] = 1.0, -2.0, 0.5
    dense = torch.randn(20, 30)
    for weight in (sparse, dense):
        module, shared, figures = encode_layer(weight, None, 4)
        assert module.bias is None and torch.equal(module.weight, shared)
        assert torch.equal(shared == 0, weight == 0)
    assert encode_layer(dense, None, 4)[2]["index"] == "bitmask"


def test_stage_artifact_loads_with_stock_torch_and_matches_the_encoded_model(tmp_path: Path) -> None:
    model = _pruned(0.9)
    reference = copy.deepcopy(model)
    ctx = _ctx()
    result = run_stage(model, "codebook", _options(), ctx)
    assert result.kind == "torchscript" and result.preferred_output_format == "torchscript"
    assert [row["layer"] for row in result.info["layers"]] == ["net.0", "net.2", "net.4"]
    for row in result.info["layers"]:
        assert row["clusters"] == 32 and row["bytes_encoded"] < row["bytes_dense"] / 10
    # the eager equivalent: every Linear with its k-means-shared weight
    for name in ("net.0", "net.2", "net.4"):
        layer = reference.get_submodule(name)
        _, shared, _ = encode_layer(layer.weight, layer.bias, 5)
        layer.weight.data.copy_(shared)
    x = torch.randn(16, 64)
    encoded_path, dense_path = tmp_path / "encoded.pt", tmp_path / "dense.pt"
    torch.jit.save(result.model, str(encoded_path))
    torch.jit.save(torch.jit.script(_pruned(0.9)), str(dense_path))
    loaded = torch.jit.load(str(encoded_path))
    with torch.no_grad():
        assert torch.allclose(loaded(x), reference(x), atol=1e-5)
        assert torch.allclose(loaded(x), result.model(x), atol=1e-6)
    assert encoded_path.stat().st_size < dense_path.stat().st_size / 5
    # re-saving the loaded module keeps it small: the decoded weight is not part of the state
    again = io.BytesIO()
    torch.jit.save(loaded, again)
    assert len(again.getvalue()) < dense_path.stat().st_size / 5
    assert getattr(loaded.net, "0").original_name == "CodebookLinear"


def test_no_layer_encoded_is_an_error_not_a_silent_no_op() -> None:
    with pytest.raises(EngineError, match="no layer was encoded"):
        run_stage(MLP().eval(), "codebook", _options(min_sparsity=0.5), _ctx())  # dense: nothing is sparse enough
    with pytest.raises(EngineError, match="no layer was encoded"):
        run_stage(_pruned(), "codebook", _options(layers={"include": ["nothing*"]}), _ctx())
    with pytest.raises(EngineError, match="TorchScript"):
        run_stage(
            torch.jit.script(_pruned()),
            "codebook",
            _options(),
            StageContext(kind="torchscript", example_input=torch.randn(2, 64)),
        )


def test_classifier_can_stay_float_and_min_sparsity_skips_dense_layers() -> None:
    model = _pruned()
    model.net[0].weight.data.normal_()  # dense again
    result = run_stage(model, "codebook", _options(prune_classifier=False, min_sparsity=0.5), _ctx())
    assert [row["layer"] for row in result.info["layers"]] == ["net.2"]
    assert [s["layer"] for s in result.info["skipped"]] == ["net.0"]
    assert getattr(result.model.net, "2").original_name == "CodebookLinear"
    assert getattr(result.model.net, "4").original_name == "Linear"


def test_deep_compression_preset_validates_and_needs_an_eager_model() -> None:
    stages = expand_preset("deep-compression")
    assert [(s["method"], s["scheme"]) for s in stages] == [("prune", "global_l1_unstructured"), ("encode", "codebook")]
    facts = JobFacts(model_format="state_dict", has_dataset=True, dataset_has_labels=True, eval_has_labels=True)
    validated = validate_stages(stages, facts)
    assert validated[1].options["bits"] == 5 and validated[1].spec.quantizes
    with pytest.raises(SpecError, match="float weights"):
        validate_stages(list(reversed(expand_preset("deep-compression"))), facts)
    # TorchScript reaches eager-only schemes through a conversion to an exported program, unless
    # inspection found that the conversion fails: then the 422 names why
    validate_stages(
        expand_preset("deep-compression"),
        JobFacts(model_format="torchscript", has_dataset=True, dataset_has_labels=True),
    )
    with pytest.raises(SpecError, match="could not be converted.*aten::foo"):
        validate_stages(
            expand_preset("deep-compression"),
            JobFacts(
                model_format="torchscript",
                has_dataset=True,
                dataset_has_labels=True,
                graph_conversion_error="unsupported node aten::foo",
            ),
        )
    with pytest.raises(SpecError, match="bits"):
        validate_stages([{"method": "encode", "scheme": "codebook", "bits": 9}], facts)
