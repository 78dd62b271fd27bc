"""Hugging Face `save_pretrained` folders: built from config.json by transformers, filled from the weights.

The model class is the task head named in `config.architectures`, accepted only when
transformers' own Auto classes map the config's `model_type` to it: never remote code,
never the hub (HF_HUB_OFFLINE). Weights come from model.safetensors (sharded or not) or
pytorch_model.bin (read with weights_only=True by transformers); every key must match.
Runs only in the sandboxed child, after `model_folder.unpack_model_folder`.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker.compression.base import EngineError
from worker.compression.model_folder import unpack_model_folder

FORMAT = "huggingface"
MAX_CONFIG_BYTES = 1024 * 1024
EXAMPLE_SEQUENCE = 16
# forward arguments declared from the config, in the order a user would pass them
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def offline() -> None:
    """No hub, no remote code; torchvision's ops declared before transformers imports it."""
    from worker.compression.torchvision_ops import declare_torchvision_ops

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    declare_torchvision_ops()  # transformers imports torchvision when it is installed


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise EngineError(f"config.json is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EngineError(f"config.json is not JSON: {error}") from error
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise EngineError('config.json needs a "model_type" that transformers knows (bert, gpt2, vit, ...)')
    if "quantization_config" in config:
        raise EngineError("config.json names a quantization_config: upload the float model (save_pretrained)")
    return config


def _auto_class_names(model_type: str) -> set[str]:
    """Every model class transformers' Auto classes map `model_type` to (AutoModel, ...ForX)."""
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for attribute, mapping in vars(modeling_auto).items():
        if attribute.endswith("_MAPPING_NAMES") and isinstance(mapping, dict):
            value = mapping.get(model_type)
            names.update([value] if isinstance(value, str) else list(value or ()))
    return names


def _model_class(config: Any) -> type[nn.Module]:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    architectures = list(getattr(config, "architectures", None) or [])
    base = MODEL_MAPPING_NAMES.get(config.model_type)
    # no head named: the bare model AutoModel builds (last_hidden_state)
    name = architectures[0] if architectures else base if isinstance(base, str) else (base or ("",))[0]
    known = _auto_class_names(config.model_type)
    model_class = getattr(transformers, name, None) if name in known else None
    if not isinstance(model_class, type) or not issubclass(model_class, transformers.PreTrainedModel):
        raise EngineError(
            f"config.architectures names {name!r}, which transformers' Auto classes do not build for "
            f"model_type {config.model_type!r} (remote code is never run); heads it knows: {sorted(known)[:20]}"
        )
    return model_class


def load_pretrained_folder(folder: Path) -> nn.Module:
    """The model a save_pretrained folder holds, in float32, every weight matched."""
    offline()
    _read_config(folder)
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)
    except (ValueError, KeyError, OSError) as error:
        raise EngineError(f"config.json could not be read by transformers: {error}") from error
    model_class = _model_class(config)
    try:
        model, info = model_class.from_pretrained(  # type: ignore[attr-defined]
            str(folder), config=config, local_files_only=True, dtype=torch.float32, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise EngineError(f"{model_class.__name__} could not load the folder's weights: {error}") from error
    problems = {k: sorted(info.get(k) or [])[:8] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        raise EngineError(
            f"weights do not fit {model_class.__name__} built from config.json: "
            + "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in problems.items() if v)
        )
    module: nn.Module = model.eval()
    return module


def load_archive(archive: Path) -> nn.Module:
    """Unpack an uploaded zip / tar of a save_pretrained folder next to it and load the model."""
    scratch = Path(tempfile.mkdtemp(prefix=archive.name + ".", dir=archive.parent))
    try:
        return load_pretrained_folder(unpack_model_folder(archive, scratch))
    finally:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)


def is_transformers_upload(model_format: str, architecture: dict[str, Any] | None) -> bool:
    """A save_pretrained folder, or weights named with a `transformers.<class>` architecture."""
    return model_format == FORMAT or str((architecture or {}).get("name", "")).startswith("transformers.")


def declared_inputs(model: nn.Module) -> list[dict[str, Any]] | None:
    """The forward inputs a job feeds the model, from its config: token ids over the vocabulary
    (plus an all-ones mask and token types where forward takes them next), or images of the
    configured size. None when the config says too little; the job then declares its own."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    # inputs are passed positionally: only a prefix of forward's parameters can be declared
    # (GPT-2's second parameter is past_key_values, so it gets input_ids alone)
    parameters = list(inspect.signature(model.forward).parameters)
    vocab = getattr(config, "vocab_size", None)
    if parameters[:1] == ["input_ids"] and isinstance(vocab, int) and vocab > 0:
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        sequence = EXAMPLE_SEQUENCE
        if isinstance(positions, int) and positions > 0:
            sequence = min(sequence, positions)
        ranges = {"input_ids": (0, vocab), "attention_mask": (1, 2)}
        types = getattr(config, "type_vocab_size", None)
        if isinstance(types, int) and types > 0:
            ranges["token_type_ids"] = (0, types)
        found = []
        for name in parameters:
            if name not in ranges:
                break
            low, high = ranges[name]
            found.append(
                {"name": name, "shape": [1, sequence], "dtype": "int64", "low": low, "high": high, "dynamic": [0, 1]}
            )
        return found
    size, channels = getattr(config, "image_size", None), getattr(config, "num_channels", None)
    if parameters[:1] == ["pixel_values"] and isinstance(size, int) and isinstance(channels, int):
        return [{"name": "pixel_values", "shape": [1, channels, size, size], "dtype": "float32", "dynamic": [0]}]
    return None


def build_from_config(class_name: str, config_fields: dict[str, Any]) -> nn.Module:
    """`transformers.<class_name>` for a config given as JSON (architecture `{"library": "transformers"}`).

    `class_name` is an Auto class ("AutoModel", "AutoModelForSequenceClassification") or a
    head transformers' Auto classes build for the config's model_type. Random weights: the
    upload's state_dict fills them.
    """
    offline()
    import transformers

    fields = dict(config_fields)
    model_type = fields.pop("model_type", None)
    if not isinstance(model_type, str):
        raise EngineError('a transformers architecture needs "config" with a "model_type" (bert, gpt2, vit, ...)')
    if "quantization_config" in fields or "auto_map" in fields:
        raise EngineError("the config may not name a quantization_config or remote code (auto_map)")
    try:
        config = transformers.AutoConfig.for_model(model_type, **fields)
    except (ValueError, KeyError, TypeError) as error:
        raise EngineError(f"transformers could not build a {model_type!r} config: {error}") from error
    if class_name.startswith("Auto"):
        auto = getattr(transformers, class_name, None)
        if not isinstance(auto, type) or not hasattr(auto, "from_config") or class_name == "AutoConfig":
            raise EngineError(f"transformers has no Auto model class {class_name!r}")
        try:
            built: nn.Module = auto.from_config(config)
        except ValueError as error:
            raise EngineError(f"{class_name} cannot build a {model_type!r} model: {error}") from error
        return built.eval()
    config.architectures = [class_name]
    model_class = _model_class(config)
    built = model_class(config)
    return built.eval()


def load_weights(module: nn.Module, weights: dict[str, torch.Tensor], label: str) -> None:
    """load_state_dict, strict but for weights tied to a loaded one (GPT-2's LM head and embedding):
    `save_pretrained` and safetensors store a tied weight once."""
    missing, unexpected = module.load_state_dict(weights, strict=False)
    tie = getattr(module, "tie_weights", None)
    if callable(tie):
        tie()
    loaded = {t.data_ptr() for k, t in module.state_dict().items() if k in weights}
    untied = [k for k in missing if module.state_dict()[k].data_ptr() not in loaded]
    if untied or unexpected:
        raise EngineError(
            f"weights do not fit architecture {label!r}: missing {sorted(untied)[:8]}, unexpected {sorted(unexpected)[:8]}"
        )
