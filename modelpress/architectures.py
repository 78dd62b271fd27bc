"""Names of registered architectures, torch-free (the API checks uploads against them).

Besides the registry, `torchvision.<model>` and `timm.<model>` name the public libraries'
constructors (built in the worker, without pretrained weights). The API checks only the
form of such a name: whether the library has that model is known only where it is installed.
"""

from __future__ import annotations

import re
from importlib.metadata import entry_points

BUILTIN_ARCHITECTURES = ("mlp", "lenet5")
ENTRY_POINT_GROUP = "modelpress.architectures"
LIBRARY_PREFIXES = ("torchvision", "timm")
# torchvision's names are lower-case identifiers; timm's may carry a dotted tag ("vit_tiny_patch16_224.augreg_in21k")
_LIBRARY_MODEL = re.compile(r"^(torchvision)\.[a-z][a-z0-9_]{0,63}$|^(timm)\.[a-z][a-z0-9_]{0,63}(\.[a-z0-9_]{1,64})?$")


def is_library_model_name(name: str) -> bool:
    """`torchvision.resnet18`, `timm.vit_tiny_patch16_224`: a public library's model, by name."""
    return _LIBRARY_MODEL.match(name) is not None


def architecture_names() -> list[str]:
    names = set(BUILTIN_ARCHITECTURES)
    names.update(entry.name for entry in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def is_known_architecture(name: str) -> bool:
    return is_library_model_name(name) or name in architecture_names()
