"""TorchScript wrappers with the model's own forward signature (`forward(x, sr: int)`).

torch.jit.trace records tensor arguments only, and a scripted wrapper needs its signature
written out as typed source: `torch.jit.script` reads a class's source from its file. So the
wrapper's source is generated from the declared inputs and constants, written to a temporary
file, imported and scripted; the ScriptModule keeps its own compiled code, not the file.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker.compression.base import EngineError

_CONSTANT_TYPES: dict[type, str] = {bool: "bool", int: "int", float: "float", str: "str"}


def script_forward(inner: nn.Module, tensors: list[str], constants: dict[str, Any], body: str) -> nn.Module:
    """A ScriptModule holding `inner` whose forward takes `tensors` (Tensor) then `constants`
    (their Python types) by name and runs `body` (indented source returning the output).

    Example:
        >>> script_forward(traced, ["x"], {"sr": 16000}, "        return self.inner(x)\\n")
    """
    parameters = [f"{name}: Tensor" for name in tensors]
    for name, value in constants.items():
        kind = _CONSTANT_TYPES.get(type(value))
        if kind is None:
            raise EngineError(
                f"constant argument {name!r} is a {type(value).__name__}; TorchScript wrappers take bool, int, float or str"
            )
        parameters.append(f"{name}: {kind}")
    source = (
        "from typing import Any\n"
        "import torch\n"
        "from torch import Tensor\n\n\n"
        "class ScriptedForward(torch.nn.Module):\n"
        "    def __init__(self, inner: torch.nn.Module) -> None:\n"
        "        super().__init__()\n"
        "        self.inner = inner\n\n"
        f"    def forward(self, {', '.join(parameters)}) -> Any:\n"
        f"{body}"
    )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "modelpress_script_forward.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(f"modelpress_script_forward_{id(path)}", path)
        assert spec is not None and spec.loader is not None  # a .py file always has a loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # the scripter resolves the class's globals through its module
        try:
            spec.loader.exec_module(module)
            scripted: nn.Module = torch.jit.script(module.ScriptedForward(inner))
        except Exception as error:
            raise EngineError(
                f"the TorchScript wrapper for forward({', '.join(parameters)}) did not compile: {error}"
            ) from error
        finally:
            del sys.modules[spec.name]
    return scripted


def check_constants(constants: dict[str, Any]) -> str:
    """Source lines refusing calls with other constant values than the artifact was specialised on."""
    lines = []
    for name, value in constants.items():
        lines.append(
            f"        if {name} != {value!r}:\n"
            f'            raise RuntimeError("this artifact was made for {name}={value!r}; call it with that value")\n'
        )
    return "".join(lines)
