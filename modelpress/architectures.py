"""Names of registered architectures, torch-free (the API checks uploads against them)."""

from __future__ import annotations

from importlib.metadata import entry_points

BUILTIN_ARCHITECTURES = ("mlp", "lenet5")
ENTRY_POINT_GROUP = "modelpress.architectures"


def architecture_names() -> list[str]:
    names = set(BUILTIN_ARCHITECTURES)
    names.update(entry.name for entry in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)
