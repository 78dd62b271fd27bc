"""Importing torchvision beside a torch whose build its C++ ops were not compiled against.

PyPI's torchvision 0.28 is a CUDA build: its `_C` extension fails to load beside the CPU
torch 2.13 the workers run, and `import torchvision` then stops at the fake-kernel
registration of `torchvision::nms` ("operator torchvision::nms does not exist"). The model
classes need none of those ops. Declaring the two op schemas that torchvision registers
kernels for at import lets it import; calling them would still fail, which no
classification model does. Where the extension loads (a CPU build of torchvision), the real
ops are used and nothing is declared.

transformers imports torchvision by itself when it is installed, so the same declaration
precedes every transformers import (`declare_torchvision_ops`).

Worker-only: the API process never imports torch.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

# kept alive for the life of the process: dropping a Library object removes its definitions
_declared: list[torch.library.Library] = []
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor",
)


def _op_exists(name: str) -> bool:
    return bool(torch._C._jit_get_schemas_for_operator(f"torchvision::{name}"))


def _extension_loads() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    extension = next(Path(spec.origin).parent.glob("_C*.so"), None)
    if extension is None:
        return False
    try:
        torch.ops.load_library(str(extension))  # type: ignore[no-untyped-call]  # torch leaves this unannotated
    except OSError:  # built against another torch (or for CUDA only)
        return False
    return True


def declare_torchvision_ops() -> None:
    """Make `import torchvision` work in this process, by whoever imports it next.

    transformers imports torchvision on its own whenever it is installed (with Pillow), so
    every process that imports transformers calls this first: the Hugging Face loader, the
    test suite's conftest and the benchmarks. Does nothing when torchvision is not installed,
    already imported, or has a C++ extension that loads.
    """
    if "torchvision" in sys.modules or _op_exists("nms") or importlib.util.find_spec("torchvision") is None:
        return
    if _extension_loads():
        return
    library = torch.library.Library("torchvision", "FRAGMENT")  # type: ignore[no-untyped-call]  # torch leaves this unannotated
    for schema in _SCHEMAS:
        if not _op_exists(schema.split("(")[0]):
            library.define(schema)  # type: ignore[no-untyped-call]  # torch leaves this unannotated
    _declared.append(library)


def import_torchvision() -> ModuleType:
    """`import torchvision`, declaring its detection ops first when its C++ extension cannot load."""
    declare_torchvision_ops()
    import torchvision

    module: ModuleType = torchvision
    return module
