"""Names of registered architectures, torch-free (the API checks uploads against them).

Besides the registry, `torchvision.<model>` and `timm.<model>` name the public libraries'
constructors (built in the worker, without pretrained weights). The API checks only the
form of such a name: whether the library has that model is known only where it is installed.
"""

from __future__ import annotations

import re
from importlib.metadata import entry_points
from typing import Any

BUILTIN_ARCHITECTURES = ("mlp", "lenet5")
ENTRY_POINT_GROUP = "modelpress.architectures"
LIBRARY_PREFIXES = ("torchvision", "timm", "transformers")
# torchvision's names are lower-case identifiers; timm's may carry a dotted tag ("vit_tiny_patch16_224.augreg_in21k");
# transformers' are class names ("AutoModel", "BertForSequenceClassification")
_LIBRARY_MODEL = re.compile(
    r"^torchvision\.[a-z][a-z0-9_]{0,63}$"
    r"|^timm\.[a-z][a-z0-9_]{0,63}(\.[a-z0-9_]{1,64})?$"
    r"|^transformers\.[A-Z][A-Za-z0-9]{0,79}$"
)


def is_library_model_name(name: str) -> bool:
    """`torchvision.resnet18`, `timm.vit_tiny_patch16_224`: a public library's model, by name."""
    return _LIBRARY_MODEL.match(name) is not None


def architecture_names() -> list[str]:
    names = set(BUILTIN_ARCHITECTURES)
    names.update(entry.name for entry in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def is_known_architecture(name: str) -> bool:
    return is_library_model_name(name) or name in architecture_names()


def normalise_architecture(value: dict[str, Any]) -> dict[str, Any]:
    """`{"library": "torchvision", "name": "resnet18", "kwargs": {...}}` as `{"name": "torchvision.resnet18", ...}`;
    a transformers `"config"` travels in kwargs. Other forms are returned as they are."""
    library = value.get("library")
    if library is None:
        return value
    if library not in LIBRARY_PREFIXES:
        raise ValueError(f"architecture.library must be one of {list(LIBRARY_PREFIXES)}, got {library!r}")
    kwargs = dict(value.get("kwargs") or {})
    if "config" in value:
        kwargs["config"] = value["config"]
    return {"name": f"{library}.{value.get('name')}", "kwargs": kwargs}
