"""Checkpoints as the libraries save them: torchvision and timm state_dicts by model name, and
Hugging Face `save_pretrained` folders uploaded as a zip or tar.

Tiny seeded random-init models built in the test, nothing downloaded. Every figure the engine
reports is checked against the test's own run of the artifact it wrote.
"""

from __future__ import annotations

import io
import math
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from worker.compression.base import EngineError
from worker.compression.huggingface import declared_inputs
from worker.compression.inputs import Signature, call_model, make_example
from worker.compression.io import load_artifact, load_model
from worker.compression.model_folder import unpack_model_folder
from worker.compression.pipeline import JobRequest, ModelRef, StageSpec, run_job
from worker.compression.registry import build_architecture
from worker.compression.torchvision_ops import import_torchvision


def require(module: str) -> None:
    """torchvision and timm are worker dependencies: missing in CI is a failure, locally a skip."""
    import importlib.util

    from tests.conftest import IN_CI

    if importlib.util.find_spec(module) is None:
        (pytest.fail if IN_CI else pytest.skip)(f"{module} is not installed (pip install -e .)")


def sqnr_db(reference: torch.Tensor, output: torch.Tensor) -> float:
    noise = (reference.float() - output.float()).pow(2).mean()
    return float(10 * torch.log10(reference.float().pow(2).mean() / noise)) if float(noise) else math.inf


def _job(tmp_path: Path, model: ModelRef, stages: list[StageSpec], **fields) -> tuple[dict, Path]:  # type: ignore[no-untyped-def]
    artifact = tmp_path / "artifact.bin"
    return run_job(JobRequest(model=model, stages=stages, artifact_path=str(artifact), **fields)), artifact


def tiny_bert_folder(folder: Path) -> torch.nn.Module:
    """A 2-layer BertForSequenceClassification written as save_pretrained writes it."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=120,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        num_labels=3,
    )
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(str(folder))
    return model


def zip_folder(folder: Path, archive: Path, inside: str = "tiny-bert") -> Path:
    with zipfile.ZipFile(archive, "w") as handle:
        for file in sorted(folder.iterdir()):
            handle.write(file, f"{inside}/{file.name}")
    return archive


# ---------------------------------------------------------------- torchvision / timm by name


def test_torchvision_resnet18_state_dict_static_int8(tmp_path: Path) -> None:
    require("torchvision")
    torchvision = import_torchvision()
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    torch.save(model.state_dict(), tmp_path / "resnet18.pt")
    np.savez(tmp_path / "images.npz", inputs=torch.randn(16, 3, 32, 32).numpy())
    architecture = {"name": "torchvision.resnet18", "kwargs": {"num_classes": 10}}
    result, artifact = _job(
        tmp_path,
        ModelRef(str(tmp_path / "resnet18.pt"), "state_dict", architecture),
        [StageSpec("quantize", "static_int8")],
        example_input_shape=[1, 3, 32, 32],
        dataset_path=str(tmp_path / "images.npz"),
    )
    quantized = load_artifact(artifact, result["artifact_format"])
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        measured = sqnr_db(model(x), quantized(x))  # type: ignore[operator]
    assert measured >= 20, measured
    ratio = (tmp_path / "resnet18.pt").stat().st_size / artifact.stat().st_size
    assert ratio >= 3, ratio
    assert result["metrics"]["compressed"]["size_bytes"] == artifact.stat().st_size


def test_timm_vit_safetensors_dynamic_int8(tmp_path: Path) -> None:
    require("timm")
    import timm

    torch.manual_seed(0)
    kwargs = {"img_size": 32, "patch_size": 8, "num_classes": 10, "depth": 2}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()
    save_file(model.state_dict(), str(tmp_path / "vit.safetensors"))
    result, artifact = _job(
        tmp_path,
        ModelRef(
            str(tmp_path / "vit.safetensors"), "safetensors", {"name": "timm.vit_tiny_patch16_224", "kwargs": kwargs}
        ),
        [StageSpec("quantize", "dynamic_int8")],
        example_input_shape=[2, 3, 32, 32],
    )
    quantized = load_artifact(artifact, result["artifact_format"])
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        measured = sqnr_db(model(x), quantized(x))  # type: ignore[operator]
    assert measured >= 20, measured
    assert abs(result["metrics"]["fidelity"]["sqnr_db"] - measured) < 3
    assert artifact.stat().st_size < (tmp_path / "vit.safetensors").stat().st_size


def test_library_names_refuse_weight_sources_and_unknown_models() -> None:
    require("timm")
    with pytest.raises(EngineError, match="would load weights"):
        build_architecture("torchvision.resnet18", {"weights": "IMAGENET1K_V1"})
    with pytest.raises(EngineError, match="would load weights"):
        build_architecture("timm.resnet18", {"pretrained": True})
    with pytest.raises(EngineError, match="torchvision has no model"):
        build_architecture("torchvision.not_a_model", {})
    with pytest.raises(EngineError, match="rejected its kwargs"):
        build_architecture("torchvision.resnet18", {"colour": "blue"})
    with pytest.raises(EngineError, match="not a torchvision model name"):
        build_architecture("torchvision.os.system", {})


def test_strict_loading_names_the_keys_that_do_not_fit(tmp_path: Path) -> None:
    require("torchvision")
    torch.manual_seed(0)
    weights = build_architecture("torchvision.resnet18", {"num_classes": 10}).state_dict()
    torch.save(weights, tmp_path / "resnet18.pt")
    with pytest.raises(EngineError, match="weights do not fit"):
        load_model(tmp_path / "resnet18.pt", "state_dict", {"name": "torchvision.resnet18", "kwargs": {}})


# ---------------------------------------------------------------- Hugging Face folders


def test_hf_folder_zip_dynamic_int8_with_inputs_from_the_config(tmp_path: Path) -> None:
    model = tiny_bert_folder(tmp_path / "saved")
    archive = zip_folder(tmp_path / "saved", tmp_path / "bert.zip")
    # no inputs declared: input_ids / attention_mask / token_type_ids come from config.json
    result, artifact = _job(
        tmp_path, ModelRef(str(archive), "huggingface"), [StageSpec("quantize", "dynamic_int8")], output="logits"
    )
    declared = declared_inputs(model)
    assert declared is not None
    assert [i["name"] for i in declared] == ["input_ids", "attention_mask", "token_type_ids"]
    assert declared[0]["high"] == 120 and declared[0]["dynamic"] == [0, 1]
    quantized = load_artifact(artifact, result["artifact_format"])
    signature = Signature.from_request(declared, None)
    assert signature is not None
    batch = make_example(signature, batch=8, seed=11)
    with torch.no_grad():
        reference = call_model(model, batch).logits
        got = call_model(quantized, batch)
    got = got["logits"] if isinstance(got, dict) else got.logits if hasattr(got, "logits") else got[0]
    measured = sqnr_db(reference, got)
    assert measured >= 25, measured
    assert result["metrics"]["compressed"]["size_bytes"] == artifact.stat().st_size
    assert artifact.stat().st_size < archive.stat().st_size


def test_hf_folder_tar_with_pytorch_model_bin_loads_strictly(tmp_path: Path) -> None:
    model = tiny_bert_folder(tmp_path / "saved")
    (tmp_path / "saved" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "saved" / "pytorch_model.bin")
    archive = tmp_path / "bert.tar.gz"
    with tarfile.open(archive, "w:gz") as handle:
        for file in sorted((tmp_path / "saved").iterdir()):
            handle.add(file, file.name)
    loaded, kind = load_model(archive, "huggingface", None)
    assert kind == "eager" and type(loaded).__name__ == "BertForSequenceClassification"
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def _zip_with(archive: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(archive, "w") as handle:
        for name, data in members.items():
            handle.writestr(name, data)
    return archive


def _tar_with_link(archive: Path) -> Path:
    with tarfile.open(archive, "w") as handle:
        link = tarfile.TarInfo("config.json")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        handle.addfile(link)
    return archive


def _tar_with_file(archive: Path, name: str) -> Path:
    with tarfile.open(archive, "w") as handle:
        info = tarfile.TarInfo(name)
        info.size = 2
        handle.addfile(info, io.BytesIO(b"{}"))
    return archive


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: _zip_with(p / "a.zip", {"../config.json": b"{}"}), r"outside the folder"),
        (lambda p: _zip_with(p / "a.zip", {"/abs/config.json": b"{}"}), r"absolute or unsafe path"),
        (lambda p: _tar_with_link(p / "a.tar"), r"is a link"),
        (lambda p: _tar_with_file(p / "a.tar", "../../config.json"), r"outside the folder"),
        (lambda p: _zip_with(p / "a.zip", {"weights.bin": b"x"}), r"no config.json"),
        (lambda p: _zip_with(p / "a.zip", {"a/config.json": b"{}", "b/config.json": b"{}"}), r"several model folders"),
    ],
)
def test_hostile_or_wrong_archives_are_refused(tmp_path: Path, make, message: str) -> None:  # type: ignore[no-untyped-def]
    archive = make(tmp_path)
    with pytest.raises(EngineError, match=message):
        unpack_model_folder(archive, tmp_path / "out")
    # nothing was written outside the destination
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [archive.name]
    assert not (tmp_path.parent / "config.json").exists()


def test_archive_limits_count_written_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.compression import model_folder

    monkeypatch.setattr(model_folder, "MAX_UNPACKED_BYTES", 1000)
    archive = _zip_with(tmp_path / "a.zip", {"config.json": b"{}", "model.safetensors": b"0" * 5000})
    with pytest.raises(EngineError, match="more than 1000 bytes"):
        unpack_model_folder(archive, tmp_path / "out")
    monkeypatch.setattr(model_folder, "MAX_MEMBERS", 3)
    archive = _zip_with(tmp_path / "b.zip", {f"f{i}.txt": b"" for i in range(5)})
    with pytest.raises(EngineError, match="more than 3 members"):
        unpack_model_folder(archive, tmp_path / "out2")


def test_config_naming_a_class_transformers_does_not_define_is_refused(tmp_path: Path) -> None:
    tiny_bert_folder(tmp_path / "saved")
    config = (tmp_path / "saved" / "config.json").read_text()
    (tmp_path / "saved" / "config.json").write_text(
        config.replace('"BertForSequenceClassification"', '"EvilRemoteModel"')
    )
    archive = zip_folder(tmp_path / "saved", tmp_path / "bert.zip")
    with pytest.raises(EngineError, match="Auto classes do not build"):
        load_model(archive, "huggingface", None)


def test_transformers_architecture_with_config_loads_a_tied_gpt2_state_dict(tmp_path: Path) -> None:
    """`{"library": "transformers", "name": "AutoModelForCausalLM", "config": {...}}` + safetensors that,
    as safetensors must, store GPT-2's tied LM head once."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from modelpress.architectures import normalise_architecture

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=90, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config).eval()
    weights = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(weights, str(tmp_path / "gpt2.safetensors"))
    architecture = normalise_architecture(
        {"library": "transformers", "name": "AutoModelForCausalLM", "config": config.to_dict()}
    )
    assert architecture["name"] == "transformers.AutoModelForCausalLM"
    loaded, kind = load_model(tmp_path / "gpt2.safetensors", "safetensors", architecture)
    assert kind == "eager" and loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    ids = torch.randint(0, 90, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    declared = declared_inputs(loaded)
    # positional inputs: GPT-2's forward takes past_key_values second, so the ids come alone
    assert declared is not None and [i["name"] for i in declared] == ["input_ids"]
    del weights["transformer.h.0.attn.c_attn.weight"]
    save_file(weights, str(tmp_path / "broken.safetensors"))
    with pytest.raises(EngineError, match=r"missing \['transformer.h.0.attn.c_attn.weight'\]"):
        load_model(tmp_path / "broken.safetensors", "safetensors", architecture)
