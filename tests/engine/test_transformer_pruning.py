"""ln_structured on transformers: attention heads and MLP channels removed from the zoo's BERT, ViT and GPT-2.

Each test checks the artifact independently of the stage's own check: it is saved and loaded
back as the README says (torch.export.load(...).module()), run at a batch and sequence length
other than the example's, and compared with the *original* model in which the removed heads /
channels are zeroed by hand (found from the artifact's weights, not from the stage's report).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from tests.zoo import VOCAB, build
from worker.compression.base import Dataset, EngineError, StageContext
from worker.compression.inputs import ModelInputs, Signature, call_model, export_program
from worker.compression.io import save_artifact
from worker.compression.pruning import run_stage

TOKENS = [
    {"name": "input_ids", "shape": [2, 12], "dtype": "int64", "low": 0, "high": VOCAB, "dynamic": [0, 1]},
    {"name": "attention_mask", "shape": [2, 12], "dtype": "int64", "low": 0, "high": 2, "dynamic": [0, 1]},
]


def _options(**changes: Any) -> dict[str, Any]:
    options = {"amount": 0.5, "heads": 0.5, "layers": None, "prune_classifier": False, "schedule": None}
    return options | {"train": None, "norm": 2.0} | changes


def _count(model: nn.Module) -> int:
    return sum(t.numel() for t in {id(t): t for t in model.state_dict().values()}.values())


def _prune_and_reload(
    model: nn.Module, example: Any, signature: Signature | None, tmp_path: Path, kind: str = "eager", **changes: Any
) -> tuple[nn.Module, dict[str, Any]]:
    result = run_stage(
        model, "ln_structured", _options(**changes), StageContext(kind=kind, example_input=example, signature=signature)
    )
    assert result.kind == "graph"
    path = tmp_path / "pruned.pt2"
    save_artifact(result.model, result.kind, "exported_program", path, example, signature)
    loaded = torch.export.load(str(path)).module()
    return loaded, result.info


def _kept(original: Tensor, pruned: Tensor, axis: int) -> list[int]:
    """Indices of the original's slices (along `axis`) that the pruned weight kept, matched by value."""
    rows, kept = original.movedim(axis, 0), pruned.movedim(axis, 0)
    return [next(i for i in range(len(rows)) if torch.equal(rows[i], row)) for row in kept]


def _zero_removed(reference: nn.Module, pruned: nn.Module, pairs: list[tuple[str, int, str, int]]) -> None:
    """In `reference`, zero the consumer inputs whose producer outputs the pruned model no longer has.

    pairs: (producer weight, its output axis, consumer weight, its input axis).
    """
    state, weights = pruned.state_dict(), dict(reference.named_parameters())
    for producer, out_axis, consumer, in_axis in pairs:
        kept = _kept(weights[producer].detach(), state[producer], out_axis)
        removed = [i for i in range(weights[producer].shape[out_axis]) if i not in kept]
        with torch.no_grad():
            weights[consumer].index_fill_(in_axis, torch.tensor(removed, dtype=torch.long), 0.0)


def _close(expected: Tensor, got: Tensor) -> None:
    assert expected.shape == got.shape
    assert torch.allclose(expected, got, rtol=1e-4, atol=1e-4), float((expected - got).abs().max())


def test_bert_loses_heads_and_mlp_channels_and_runs_at_new_shapes(tmp_path: Path) -> None:
    entry = build("bert")
    signature = Signature.from_request(TOKENS, None)
    example = ModelInputs(list(entry.inputs), ["input_ids", "attention_mask"])
    pruned, info = _prune_and_reload(copy.deepcopy(entry.model), example, signature, tmp_path)
    assert [row["heads_after"] for row in info["attention"]] == [1, 1]
    assert [row["channels_after"] for row in info["mlp"]] == [32, 32]
    assert _count(pruned) < 0.7 * _count(entry.model)
    assert info["macs_after"] < 0.6 * info["macs_before"]
    reference = copy.deepcopy(entry.model)
    pairs = []
    for layer in range(2):
        prefix = f"encoder.layer.{layer}."
        # a head is 16 rows of query (and key, value): the query's kept rows give the kept heads
        pairs.append((prefix + "attention.self.query.weight", 0, prefix + "attention.output.dense.weight", 1))
        pairs.append((prefix + "intermediate.dense.weight", 0, prefix + "output.dense.weight", 1))
    _zero_removed(reference, pruned, pairs)
    ids = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[:, 5:] = 0
    with torch.no_grad():
        _close(reference(ids, mask)[0], pruned(ids, mask)[0])


def test_vit_with_torch_multihead_attention(tmp_path: Path) -> None:
    entry = build("vit")
    pruned, info = _prune_and_reload(copy.deepcopy(entry.model), entry.inputs[0], None, tmp_path)
    assert [row["heads_after"] for row in info["attention"]] == [2, 2]  # 3 heads, half rounded down removed
    assert pruned.state_dict()["blocks.0.attn.out_proj.weight"].shape == (48, 32)
    assert _count(pruned) < 0.75 * _count(entry.model)
    reference = copy.deepcopy(entry.model)
    pairs = []
    for block in range(2):
        prefix = f"blocks.{block}."
        pairs.append((prefix + "mlp.0.weight", 0, prefix + "mlp.2.weight", 1))
        # the fused in_proj's first third is the query: its kept rows name the kept heads' channels
        kept = _kept(
            reference.get_parameter(prefix + "attn.in_proj_weight")[:48].detach(),
            pruned.state_dict()[prefix + "attn.in_proj_weight"][:32],
            0,
        )
        with torch.no_grad():
            removed = torch.tensor([c for c in range(48) if c not in kept])
            reference.get_parameter(prefix + "attn.out_proj.weight").index_fill_(1, removed, 0.0)
    _zero_removed(reference, pruned, pairs)
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _close(reference(images), pruned(images))


def test_gpt2_with_fused_conv1d_attention_and_tied_head(tmp_path: Path) -> None:
    entry = build("gpt2")
    signature = Signature.from_request([TOKENS[0]], None)
    example = ModelInputs([entry.inputs[0]], ["input_ids"])
    pruned, info = _prune_and_reload(copy.deepcopy(entry.model), example, signature, tmp_path)
    assert [row["heads_after"] for row in info["attention"]] == [1, 1]
    state = pruned.state_dict()
    assert state["transformer.h.0.attn.c_attn.weight"].shape == (32, 48)  # Conv1D: [in, 3 x kept heads x 16]
    assert state["lm_head.weight"].shape == (VOCAB, 32)  # the token embedding (tied to the LM head) stays
    reference = copy.deepcopy(entry.model)
    for block in range(2):
        prefix = f"transformer.h.{block}."
        kept = _kept(
            reference.get_parameter(prefix + "attn.c_attn.weight")[:, :32].detach(),
            state[prefix + "attn.c_attn.weight"][:, :16],
            1,
        )
        with torch.no_grad():
            removed = torch.tensor([c for c in range(32) if c not in kept])
            reference.get_parameter(prefix + "attn.c_proj.weight").index_fill_(0, removed, 0.0)
    _zero_removed(
        reference,
        pruned,
        [(f"transformer.h.{b}.mlp.c_fc.weight", 1, f"transformer.h.{b}.mlp.c_proj.weight", 0) for b in range(2)],
    )
    ids = torch.randint(0, VOCAB, (4, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _close(reference(ids)[0], pruned(ids)[0])


class EmbeddingClassifier(nn.Module):
    """Token ids -> embedding -> mean -> MLP: an exported graph with aten.embedding and no attention."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 16)
        self.hidden = nn.Linear(16, 64)
        self.classifier = nn.Linear(64, 4)

    def forward(self, ids: Tensor) -> Tensor:
        return self.classifier(torch.relu(self.hidden(self.embedding(ids).mean(1))))


def test_exported_program_with_embedding_prunes_without_batch_specialisation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = EmbeddingClassifier().eval()
    signature = Signature.from_request([TOKENS[0]], None)
    ids = torch.randint(0, VOCAB, (2, 12))
    example = ModelInputs([ids], ["input_ids"])
    graph = export_program(model, signature, example).module()
    pruned, info = _prune_and_reload(graph, example, signature, tmp_path, kind="graph", heads=0.0, amount=0.5)
    assert info["mlp"] == [{"layer": "hidden", "channels_before": 64, "channels_after": 32}]
    reference = copy.deepcopy(model)
    _zero_removed(reference, pruned, [("hidden.weight", 0, "classifier.weight", 1)])
    other = torch.randint(0, VOCAB, (5, 3))
    with torch.no_grad():
        _close(reference(other), pruned(other))


def test_zoo_bert_exported_program_prunes_as_uploaded(tmp_path: Path) -> None:
    entry = build("bert")
    graph = torch.export.load(str(entry.save_exported(tmp_path / "bert.pt2"))).module()
    example = ModelInputs(list(entry.inputs), ["input_ids", "attention_mask"])
    result = run_stage(graph, "ln_structured", _options(), StageContext(kind="graph", example_input=example))
    assert _count(result.model) < 0.7 * _count(entry.model)
    with torch.no_grad():
        assert call_model(result.model, example[:1])[0].shape == (1, 12, 32)  # the upload's batch stays dynamic


def test_lstm_heads_refuse_with_the_reason(tmp_path: Path) -> None:
    # its hidden units can go (tests/engine/test_recurrent_and_constants.py); heads it has none
    entry = build("lstm")
    graph = torch.export.load(str(entry.save_exported(tmp_path / "lstm.pt2"))).module()
    example = ModelInputs(list(entry.inputs), ["input_ids"])
    with pytest.raises(EngineError, match="no attention"):
        run_stage(graph, "ln_structured", _options(), StageContext(kind="graph", example_input=example))


def test_pruned_graph_fine_tunes_on_a_labelled_dataset() -> None:
    """`train` after channel removal: the pruned exported graph is fine-tuned and learns the task (chance: 0.25)."""
    torch.manual_seed(0)
    model = EmbeddingClassifier().eval()
    ids = torch.randint(0, VOCAB, (256, 12))
    labels = (ids[:, 0] % 4).long()  # the first token's id decides the class
    data = Dataset(ModelInputs([ids], ["input_ids"]), labels)
    signature = Signature.from_request([TOKENS[0]], None)
    example = ModelInputs([ids[:2]], ["input_ids"])
    context = StageContext(kind="eager", example_input=example, signature=signature, train_data=data)
    train = {"optimizer": "adam", "lr": 0.01, "epochs": 15, "batch_size": 32}
    result = run_stage(model, "ln_structured", _options(heads=0.0, train=train), context)
    assert result.info["mlp"][0]["channels_after"] == 32
    assert result.info["finetune"]["epochs_run"] == 15
    with torch.no_grad():
        accuracy = float((result.model(ids).argmax(1) == labels).float().mean())
    assert accuracy > 0.5, accuracy  # chance is 0.25


def test_uploaded_cnn_program_keeps_its_dynamic_batch_through_a_job(tmp_path: Path) -> None:
    """The upload bounds its batch (max 1024) more tightly than the engine asks: the re-export takes the
    program's own range instead of falling back to the example's batch ("Guard failed: x.size()[0] == 2")."""
    from worker.compression.pipeline import JobRequest, ModelRef, StageSpec, run_job

    entry = build("resnet")
    path = entry.save_exported(tmp_path / "resnet.pt2")
    artifact = tmp_path / "artifact.pt2"
    request = JobRequest(
        model=ModelRef(str(path), "exported_program"),
        stages=[StageSpec("prune", "ln_structured", {"amount": 0.3})],
        artifact_path=str(artifact),
        example_input_shape=[1, 3, 32, 32],
    )
    run_job(request)
    pruned = torch.export.load(str(artifact)).module()
    assert _count(pruned) < 0.8 * _count(entry.model)
    with torch.no_grad():
        assert pruned(torch.randn(3, 3, 32, 32)).shape == (3, 10)
