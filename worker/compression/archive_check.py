"""Exported-program archives (.pt2) without running their pickles.

torch 2.13's `torch.export.load` unpickles parts of a .pt2 archive with
`weights_only=False` (sample inputs, weights or constants stored "as pickles").
A crafted archive can therefore run code on load. We read the archive as a zip
first and refuse it when any pickled member references a global outside torch's
weights-only allowlist; then we load it with every `torch.load` forced to
`weights_only=True` and the plain `pickle.loads` of the archive reader replaced
by a restricted unpickler. Both layers run inside the sandbox as well.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import pickle
import pickletools
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from worker.compression.base import EngineError

ZIP_MAGIC = b"PK\x03\x04"
# plain pickles (the archive's own pickle.dumps members) may only name these; torch's allowlist covers the rest
PLAIN_PICKLE_GLOBALS = frozenset(
    {"collections.OrderedDict", "builtins.set", "builtins.frozenset", "builtins.slice", "builtins.complex"}
)


def _torch_safe_globals() -> set[str]:
    from torch._weights_only_unpickler import _get_allowed_globals

    return set(_get_allowed_globals().keys())


def pickle_globals(data: bytes) -> list[str] | None:
    """Every global a raw pickle names (GLOBAL / STACK_GLOBAL), read by opcode, nothing executed.

    None when the bytes are not a well-formed pickle (raw tensor data may start with 0x80 by chance): such a
    member cannot be unpickled by anyone, so it names nothing.
    """
    names: list[str] = []
    recent_strings: list[str] = []
    try:
        for opcode, argument, _ in pickletools.genops(data):
            if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                recent_strings.append(str(argument))
            elif opcode.name == "GLOBAL":
                module, _, name = str(argument).partition(" ")
                names.append(f"{module}.{name}")
            elif opcode.name == "STACK_GLOBAL":
                if len(recent_strings) < 2:
                    names.append("<unresolvable STACK_GLOBAL>")
                else:
                    names.append(f"{recent_strings[-2]}.{recent_strings[-1]}")
            elif opcode.name in ("INST", "OBJ"):
                names.append(f"<{opcode.name} opcode>")
    except Exception:
        return None
    return names


def _unsafe_in_member(name: str, data: bytes, allowed: set[str]) -> list[str]:
    if data.startswith(ZIP_MAGIC):  # a nested torch.save archive
        try:
            referenced = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
        except Exception:
            return []  # not a torch.save archive (raw bytes that start like one): torch.load cannot read it either
        return [g for g in referenced if g not in allowed]
    if data[:1] == b"\x80":  # a raw pickle (protocol 2+), or raw tensor bytes that happen to start with 0x80
        names = pickle_globals(data)
        return [g for g in names or [] if g not in allowed and g not in PLAIN_PICKLE_GLOBALS]
    return []


def check_exported_program_archive(path: Path) -> None:
    """Refuse a .pt2 whose pickled members need globals beyond the allowlist (or that is not a zip)."""
    if not zipfile.is_zipfile(path):
        raise EngineError("an exported program (.pt2) must be a zip archive written by torch.export.save")
    allowed = _torch_safe_globals()
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            with archive.open(info) as member:
                head = member.read(4)
            if not (head.startswith(ZIP_MAGIC) or head[:1] == b"\x80"):
                continue
            unsafe = _unsafe_in_member(info.filename, archive.read(info), allowed)
            if unsafe:
                raise EngineError(
                    f"the exported program's member {info.filename!r} is a pickle that references globals outside "
                    f"the allowlist: {sorted(set(unsafe))[:5]}; re-save the program with torch.export.save from "
                    "plain tensors"
                )


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        qualified = f"{module}.{name}"
        if qualified in PLAIN_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {qualified} is not allowed in an exported program")


def _restricted_loads(data: bytes, *args: Any, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(io.BytesIO(data)).load()


@contextlib.contextmanager
def _weights_only_loading() -> Iterator[None]:
    """Inside: every torch.load is weights_only=True, and the archive reader's pickle.loads is restricted."""
    from torch.export.pt2_archive import _package

    original_load = torch.load
    original_loads = _package.pickle.loads  # type: ignore[attr-defined]  # the stdlib pickle that torch's archive reader imports

    def forced_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original_load(*args, **kwargs)

    torch.load = forced_load
    _package.pickle.loads = _restricted_loads  # type: ignore[attr-defined]  # the stdlib pickle that torch's archive reader imports
    try:
        yield
    finally:
        torch.load = original_load
        _package.pickle.loads = original_loads  # type: ignore[attr-defined]  # the stdlib pickle that torch's archive reader imports


# a .pt2's calling convention (pytree specs) names the output's class; these libraries register theirs on import
_SPEC_LIBRARIES = ("transformers",)
_MAX_PROGRAM_JSON_BYTES = 512 * 1024 * 1024
_MODULE_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def spec_types(path: Path) -> set[str]:
    """The classes a .pt2's input / output pytree specs name ("transformers.modeling_outputs.ModelOutput"),
    read from the archive's program JSON: nothing unpickled, nothing imported."""
    names: set[str] = set()
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            parts = info.filename.split("/")
            if len(parts) < 2 or parts[-2] != "models" or not parts[-1].endswith(".json"):
                continue
            if info.file_size > _MAX_PROGRAM_JSON_BYTES:
                raise EngineError(
                    f"the exported program's {info.filename!r} is larger than {_MAX_PROGRAM_JSON_BYTES} bytes"
                )
            try:
                program = json.loads(archive.read(info))
                calls = program["graph_module"]["module_call_graph"]
                for call in calls:
                    for key in ("in_spec", "out_spec"):
                        spec = (call.get("signature") or {}).get(key)
                        if isinstance(spec, str):
                            _collect_types(json.loads(spec), names)
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # torch.export.load reports a malformed program itself
    return names


def _collect_types(node: Any, names: set[str]) -> None:
    if isinstance(node, dict):
        if isinstance(node.get("type"), str):
            names.add(node["type"])
        for child in node.get("children_spec") or ():
            _collect_types(child, names)
    elif isinstance(node, list):
        for child in node:
            _collect_types(child, names)


def import_spec_libraries(path: Path) -> None:
    """Import the modules of the library classes a .pt2's specs name (transformers' ModelOutput
    types register themselves with torch's pytree when their module is imported; torch.export.load
    cannot rebuild the output spec before). Only modules of `_SPEC_LIBRARIES`, only when installed:
    library code runs, nothing of the archive does."""
    modules = {
        name.rpartition(".")[0]
        for name in spec_types(path)
        if _MODULE_PATH.fullmatch(name) and name.split(".", 1)[0] in _SPEC_LIBRARIES
    }
    for module in sorted(modules):
        library = module.split(".", 1)[0]
        if importlib.util.find_spec(library) is None:
            continue  # torch.export.load then names the type it cannot find
        if library == "transformers":
            from worker.compression.huggingface import offline

            offline()  # never the hub; torchvision's ops declared before transformers imports it
        try:
            importlib.import_module(module)
        except ImportError:
            continue  # not a module of the installed version: torch.export.load names the type


def load_exported_program(path: Path) -> torch.export.ExportedProgram:
    """torch.export.load, after the archive check and with pickles restricted to weights."""
    check_exported_program_archive(path)
    import_spec_libraries(path)
    try:
        with _weights_only_loading(), open(path, "rb") as handle:
            return torch.export.load(handle)
    except EngineError:
        raise
    except Exception as error:
        raise EngineError(f"exported program could not be loaded: {error}") from error
