"""Pruning stage: exact sparsity, real channel removal, a sparse artifact that stock torch loads."""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.zoo import readme_loader
from worker.compression.base import Dataset, EngineError, ModelKind, StageContext
from worker.compression.pruning import cubic_sparsity, magnitude_masks, nm_mask, run_stage
from worker.compression.sparse_format import decode_sparse_state_dict, encode_sparse_state_dict, encoded_bytes

BATCH = torch.export.Dim("batch", min=1, max=4096)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 64, 3, padding=1)
        self.f1 = nn.Linear(64 * 2 * 2, 128)
        self.f2 = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = x.view(-1, 1, 8, 8)
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.f2(F.relu(self.f1(x.flatten(1))))


def _train(model: nn.Module, data: Dataset, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(data), 64):
            index = order[start : start + 64]
            loss = F.cross_entropy(model(data.inputs[index]), data.labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def _accuracy(model: nn.Module, data: Dataset) -> float:
    with torch.no_grad():
        return float((model(data.inputs).argmax(1) == data.labels).float().mean())


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits() -> tuple[Dataset, Dataset]:
    from sklearn.datasets import load_digits

    inputs, labels = load_digits(return_X_y=True)
    x = torch.tensor(inputs / 16.0, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    return Dataset(x[train], y[train]), Dataset(x[test], y[test])


@pytest.fixture(scope="module")
def trained_mlp(digits: tuple[Dataset, Dataset]) -> nn.Module:
    torch.manual_seed(0)
    return _train(MLP(), digits[0], epochs=15)


def _as_kind(model: nn.Module, kind: ModelKind, example: Tensor) -> nn.Module:
    model = copy.deepcopy(model).eval()
    if kind == "torchscript":
        buffer = io.BytesIO()
        torch.jit.save(torch.jit.script(model), buffer)
        buffer.seek(0)
        return torch.jit.load(buffer)
    if kind == "graph":
        return torch.export.export(model, (example,), dynamic_shapes=({0: BATCH},)).module()
    return model


def _options(**changes: Any) -> dict[str, Any]:
    return {
        "amount": 0.8,
        "layers": None,
        "prune_classifier": False,
        "schedule": None,
        "train": None,
        "norm": 2.0,
        **changes,
    }


def _weights(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith("weight")}


EXAMPLE = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["eager", "torchscript", "graph"])
@pytest.mark.parametrize("scheme", ["l1_unstructured", "random_unstructured", "global_l1_unstructured"])
def test_unstructured_hits_amount_and_leaves_classifier(trained_mlp: nn.Module, scheme: str, kind: ModelKind) -> None:
    model = _as_kind(trained_mlp, kind, EXAMPLE)
    before = _weights(model)
    result = run_stage(model, scheme, _options(amount=0.8), StageContext(kind=kind, example_input=EXAMPLE))

    after = _weights(result.model)
    hidden = ["net.0.weight", "net.2.weight"]
    zeros = sum(int((after[k] == 0).sum()) for k in hidden)
    total = sum(after[k].numel() for k in hidden)
    assert zeros / total == pytest.approx(0.8, abs=0.01)
    if scheme != "global_l1_unstructured":
        for key in hidden:
            assert float((after[key] == 0).float().mean()) == pytest.approx(0.8, abs=0.01)
    assert torch.equal(after["net.4.weight"], before["net.4.weight"])
    # surviving weights keep their values: masks are baked in, nothing rescaled
    for key in hidden:
        kept = after[key] != 0
        assert torch.equal(after[key][kept], before[key][kept])
    keys = list(result.model.state_dict())
    assert not any("weight_orig" in k or "weight_mask" in k for k in keys)
    assert result.preferred_output_format == "sparse_state_dict"
    assert result.info["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert [row["layer"] for row in result.info["layers"] if row["targeted"]] == ["net.0", "net.2"]
    assert result.info["macs_before"] == result.info["macs_after"] > 0
    assert torch.isfinite(result.model(EXAMPLE)).all()


def test_eager_result_has_no_pruning_hooks(trained_mlp: nn.Module) -> None:
    model = copy.deepcopy(trained_mlp)
    run_stage(model, "l1_unstructured", _options(), StageContext(kind="eager", example_input=EXAMPLE))
    for module in model.modules():
        assert not module._forward_pre_hooks
        assert set(module._parameters) <= {"weight", "bias"}
        assert not any(name.endswith("_mask") for name in module._buffers)


def test_magnitude_masks_are_monotone_with_previous() -> None:
    weight = torch.randn(50, 40, generator=torch.Generator().manual_seed(0))
    first = magnitude_masks([weight], 0.5)[0]
    second = magnitude_masks([weight], 0.7, random=True, previous=[first], generator=torch.Generator().manual_seed(1))[
        0
    ]
    assert int((~first).sum()) == 1000 and int((~second).sum()) == 1400
    assert not (second & ~first).any()  # nothing pruned comes back


def test_cubic_schedule() -> None:
    assert [round(cubic_sparsity(t, 4, 0.9), 6) for t in range(5)] == [0.0, 0.520312, 0.7875, 0.885938, 0.9]


@pytest.mark.parametrize("kind", ["eager", "torchscript", "graph"])
def test_two_four_pattern(trained_mlp: nn.Module, kind: ModelKind) -> None:
    model = _as_kind(trained_mlp, kind, EXAMPLE)
    options = {"n": 2, "m": 4, "layers": None, "prune_classifier": False, "train": None}
    result = run_stage(model, "nm_semi_structured", options, StageContext(kind=kind, example_input=EXAMPLE))
    weights = _weights(result.model)
    for key in ("net.0.weight", "net.2.weight"):
        w = weights[key]
        assert bool(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all())
    assert not bool((weights["net.4.weight"] == 0).any())
    assert result.info["sparsity"] == pytest.approx(0.5, abs=0.001)
    assert result.preferred_output_format == "sparse_state_dict"


def test_nm_on_conv_skips_layers_that_do_not_divide() -> None:
    model = CNN().eval()
    options = {"n": 2, "m": 4, "layers": None, "prune_classifier": False, "train": None}
    result = run_stage(model, "nm_semi_structured", options, StageContext(kind="eager", example_input=EXAMPLE))
    assert result.info["skipped_layers"] == ["c1"]  # 1 x 3 x 3 = 9 inputs per output
    for w in (model.c2.weight, model.f1.weight):
        assert bool(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all())
    assert nm_mask(torch.tensor([[4.0, -1.0, 3.0, 0.5, 0.0, 0.0, -2.0, 1.0]]), 1, 4).tolist() == [
        [True, False, False, False, False, False, True, False]
    ]


def _parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", ["eager", "graph"])
def test_ln_structured_removes_channels(kind: ModelKind) -> None:
    torch.manual_seed(0)
    original = CNN().eval()
    model = _as_kind(original, kind, EXAMPLE)
    result = run_stage(model, "ln_structured", _options(amount=0.5), StageContext(kind=kind, example_input=EXAMPLE))
    pruned = result.model

    assert result.kind == kind
    assert _parameter_count(pruned) <= 0.55 * _parameter_count(original)
    shapes = {row["layer"]: row["shape_after"] for row in result.info["layers"]}
    assert shapes == {"c1": [16, 1, 3, 3], "c2": [32, 16, 3, 3], "f1": [64, 128], "f2": [10, 64]}
    assert result.info["macs_after"] <= 0.55 * result.info["macs_before"]
    with torch.no_grad():
        assert pruned(EXAMPLE).shape == (8, 10)
        assert pruned(EXAMPLE[:3]).shape == (3, 10)
    program = torch.export.export(pruned, (EXAMPLE,), dynamic_shapes=({0: BATCH},))
    reloaded = program.module()
    with torch.no_grad():
        assert torch.allclose(reloaded(EXAMPLE[:5]), pruned(EXAMPLE[:5]), atol=1e-5)
    state = pruned.state_dict()
    assert sum(v.numel() for v in state.values() if v.is_floating_point()) <= 0.55 * _parameter_count(original)


def test_ln_structured_keeps_surviving_channels_exactly() -> None:
    """Kept neurons compute what they did: the original with the removed ones zeroed gives the same output."""
    torch.manual_seed(0)
    original = CNN().eval()
    model = copy.deepcopy(original)
    run_stage(
        model,
        "ln_structured",
        _options(amount=0.5, layers={"include": ["f1"]}),
        StageContext(kind="eager", example_input=EXAMPLE),
    )
    assert model.f1.weight.shape == (64, 256) and model.c2.weight.shape == (64, 32, 3, 3)
    rows = original.f1.weight.detach()
    kept = [int((rows == row).all(dim=1).nonzero()) for row in model.f1.weight.detach()]
    drop = torch.ones(128, dtype=torch.bool)
    drop[kept] = False
    masked = copy.deepcopy(original)
    with torch.no_grad():
        masked.f1.weight[drop] = 0
        masked.f1.bias[drop] = 0
        assert torch.allclose(masked(EXAMPLE), model(EXAMPLE), atol=1e-5)


class BatchNormCNN(nn.Module):
    """Batch norm between convs and a reshape to a fixed feature count, as people write them."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.c2 = nn.Conv2d(32, 64, 3, padding=1)
        self.f1 = nn.Linear(64 * 2 * 2, 128)
        self.f2 = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.bn(self.c1(x.reshape(-1, 1, 8, 8)))), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.f2(F.relu(self.f1(x.reshape(-1, 256))))


def test_ln_structured_on_graph_with_batch_norm_and_fixed_reshape() -> None:
    torch.manual_seed(0)
    original = BatchNormCNN().eval()
    with torch.no_grad():
        original.bn.running_mean.uniform_(-0.5, 0.5)
        original.bn.running_var.uniform_(0.5, 2.0)
    graph = _as_kind(original, "graph", EXAMPLE)
    result = run_stage(graph, "ln_structured", _options(amount=0.5), StageContext(kind="graph", example_input=EXAMPLE))
    pruned = result.model
    assert isinstance(pruned.bn, nn.BatchNorm2d) and pruned.bn.running_mean.shape == (16,)
    assert _parameter_count(pruned) <= 0.55 * _parameter_count(original)
    with torch.no_grad():
        assert pruned(EXAMPLE[:3]).shape == (3, 10)
    program = torch.export.export(pruned, (EXAMPLE,), dynamic_shapes=({0: BATCH},))
    assert program.module()(EXAMPLE[:2]).shape == (2, 10)


def test_bad_requests_say_what_to_change(trained_mlp: nn.Module) -> None:
    script = _as_kind(trained_mlp, "torchscript", EXAMPLE)
    with pytest.raises(EngineError, match="TorchScript"):
        run_stage(
            script, "ln_structured", _options(amount=0.5), StageContext(kind="torchscript", example_input=EXAMPLE)
        )
    with pytest.raises(EngineError, match="match no prunable layer"):
        run_stage(
            copy.deepcopy(trained_mlp),
            "l1_unstructured",
            _options(layers={"include": ["encoder.*"]}),
            StageContext(kind="eager", example_input=EXAMPLE),
        )
    with pytest.raises(EngineError, match="dataset_id with labels"):
        run_stage(
            copy.deepcopy(trained_mlp),
            "l1_unstructured",
            _options(schedule={"steps": 2, "finetune_epochs": 1}),
            StageContext(kind="eager", example_input=EXAMPLE),
        )


def test_sparse_state_dict_roundtrip_and_weights_only_load(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    linear = torch.randn(30, 20, generator=generator)
    linear[linear.abs() < 1.0] = 0
    conv = torch.randn(16, 8, 3, 3, generator=generator)
    conv[torch.rand(16, 8, generator=generator) < 0.9] = 0  # whole kernels gone
    unstructured_conv = torch.randn(16, 8, 3, 3, generator=generator)
    unstructured_conv[unstructured_conv.abs() < 1.0] = 0
    state = {
        "a.weight": linear,
        "a.bias": torch.randn(30, generator=generator),
        "b.weight": conv,
        "c.weight": unstructured_conv,
        "d.weight": torch.randn(5, 5, generator=generator),
        "bn.num_batches_tracked": torch.tensor(3),
    }

    encoded = encode_sparse_state_dict(state)
    assert encoded["a.weight"].layout == torch.sparse_csr
    assert encoded["a.weight"].col_indices().dtype == torch.int32
    assert encoded["b.weight"].layout == torch.sparse_csr and encoded["b.weight"].shape == conv.shape
    assert encoded["c.weight"].layout == torch.strided  # few all-zero kernels: dense is smaller
    assert encoded["d.weight"].layout == torch.strided
    compact = encode_sparse_state_dict(state, compact=True)
    for key in ("a.weight", "b.weight", "c.weight"):  # a bitmask or relative indices beat dense and CSR
        assert isinstance(compact[key], dict) and encoded_bytes(compact[key]) < encoded_bytes(encoded[key])
    assert compact["d.weight"].layout == torch.strided  # no zeros
    for layout, chosen in (("sparse", encoded), ("compact", compact)):
        path = tmp_path / f"{layout}.pt"
        torch.save(chosen, path)
        loaded = torch.load(path, weights_only=True)
        if layout == "sparse":  # every entry a stock tensor: the one-line dense conversion works too
            one_liner = {k: v.to_dense() if v.layout != torch.strided else v for k, v in loaded.items()}
            assert all(torch.equal(one_liner[key], value) for key, value in state.items())
        # the README's loading code, verbatim
        dense = readme_loader()["decode_sparse_state_dict"](loaded)
        assert dense.keys() == state.keys()
        for key, value in state.items():
            assert torch.equal(dense[key], value) and dense[key].shape == value.shape
            assert torch.equal(decode_sparse_state_dict(loaded)[key], value)


def test_sparse_artifact_is_small_for_pruned_torchscript_mlp(trained_mlp: nn.Module, tmp_path: Path) -> None:
    script_path = tmp_path / "mlp.ts"
    torch.jit.save(torch.jit.script(copy.deepcopy(trained_mlp)), str(script_path))
    model = torch.jit.load(str(script_path))
    result = run_stage(
        model, "l1_unstructured", _options(amount=0.8), StageContext(kind="torchscript", example_input=EXAMPLE)
    )
    artifact = tmp_path / "mlp_sparse.pt"
    torch.save(encode_sparse_state_dict({k: v.detach() for k, v in result.model.state_dict().items()}), artifact)

    ratio = artifact.stat().st_size / script_path.stat().st_size
    assert ratio <= 0.45
    loaded = torch.load(artifact, weights_only=True)
    weights = {k: v for k, v in decode_sparse_state_dict(loaded).items() if k.endswith("weight")}
    zeros = sum(int((weights[k] == 0).sum()) for k in ("net.0.weight", "net.2.weight"))
    assert zeros / (64 * 300 + 300 * 100) == pytest.approx(0.8, abs=0.01)
    restored = MLP()
    restored.load_state_dict(decode_sparse_state_dict(loaded))
    with torch.no_grad():
        assert torch.equal(restored(EXAMPLE), result.model(EXAMPLE))


def test_gradual_pruning_keeps_digits_accuracy(trained_mlp: nn.Module, digits: tuple[Dataset, Dataset]) -> None:
    train, test = digits
    baseline = _accuracy(trained_mlp, test)
    model = copy.deepcopy(trained_mlp)
    options = _options(
        amount=0.9,
        schedule={"steps": 3, "finetune_epochs": 2},
        train={"optimizer": "adam", "lr": 1e-3, "batch_size": 64},
    )
    seen: list[float] = []
    ctx = StageContext(
        kind="eager", example_input=EXAMPLE, train_data=train, progress=lambda fraction, message: seen.append(fraction)
    )
    result = run_stage(model, "l1_unstructured", options, ctx)

    assert result.info["sparsity"] == pytest.approx(0.9, abs=0.01)  # masks held through fine-tuning
    assert [step["target_sparsity"] for step in result.info["schedule"]] == [
        round(cubic_sparsity(t, 3, 0.9), 6) for t in (1, 2, 3)
    ]
    assert all(step["epochs_run"] == 2 for step in result.info["schedule"])
    gradual = _accuracy(model, test)
    assert gradual >= baseline - 0.03
    assert seen == sorted(seen) and seen[-1] == 1.0
    # the fine-tuning is what keeps it: one-shot to the same sparsity loses clearly more
    one_shot = copy.deepcopy(trained_mlp)
    run_stage(one_shot, "l1_unstructured", _options(amount=0.9), StageContext(kind="eager", example_input=EXAMPLE))
    assert _accuracy(one_shot, test) < gradual - 0.05


@pytest.mark.parametrize("kind", ["torchscript", "graph"])
def test_finetuning_holds_masks_on_every_kind(
    trained_mlp: nn.Module, digits: tuple[Dataset, Dataset], kind: ModelKind
) -> None:
    train, test = digits
    model = _as_kind(trained_mlp, kind, EXAMPLE)
    options = _options(amount=0.8, train={"epochs": 1, "lr": 1e-3})
    result = run_stage(
        model, "global_l1_unstructured", options, StageContext(kind=kind, example_input=EXAMPLE, train_data=train)
    )
    weights = _weights(result.model)
    zeros = sum(int((weights[k] == 0).sum()) for k in ("net.0.weight", "net.2.weight"))
    assert zeros / (64 * 300 + 300 * 100) == pytest.approx(0.8, abs=0.01)
    assert result.info["finetune"]["epochs_run"] == 1
    assert _accuracy(result.model, test) >= _accuracy(trained_mlp, test) - 0.05


def test_gradual_structured_pruning_finetunes(digits: tuple[Dataset, Dataset]) -> None:
    full_train, test = digits
    train = Dataset(full_train.inputs[:700], full_train.labels[:700])
    torch.manual_seed(0)
    original = _train(CNN(), train, epochs=4)
    model = copy.deepcopy(original)
    options = _options(amount=0.5, schedule={"steps": 2, "finetune_epochs": 1}, train={"lr": 1e-3})
    result = run_stage(
        model, "ln_structured", options, StageContext(kind="eager", example_input=EXAMPLE, train_data=train)
    )
    assert model.c2.weight.shape == (32, 16, 3, 3)
    assert [step["target_channel_ratio"] for step in result.info["schedule"]] == [0.4375, 0.5]
    assert _accuracy(model, test) >= _accuracy(original, test) - 0.05
