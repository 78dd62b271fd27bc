"""Breadcrumbs: where the job was when its process died without a word.

A native crash (SIGSEGV, SIGBUS, SIGABRT) ends the sandboxed child before any Python error
handler runs, so the child writes the stage and the operation it is in to a small file in its
scratch folder before each risky step; the parent reads the last one back and names it in the
job's error (worker.crash_report). Outside the sandbox (no file set) every call is a no-op.

Pure standard library: the engine and the sandbox's child both import it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

FILE_NAME = "breadcrumbs.json"

_path: Path | None = None
_state: dict[str, Any] = {"stage": "starting", "operation": "importing the engine", "model": {}}


def leave_in(folder: Path) -> None:
    """Write breadcrumbs to `folder`/breadcrumbs.json from now on."""
    global _path
    _path = folder / FILE_NAME
    _write()


def stage(name: str) -> None:
    """The job entered stage `name` (e.g. "quantize:static_int8")."""
    _state["stage"] = name
    _state["operation"] = "starting"
    _write()


def operation(text: str) -> None:
    """The current stage is about to run `text` (e.g. "calibrating", "torch.export")."""
    if _state["operation"] != text:
        _state["operation"] = text
        _write()


def model_facts(**facts: Any) -> None:
    """Facts about the loaded model that explain a crash (its kind, recurrent layers)."""
    _state["model"].update(facts)
    _write()


@contextmanager
def within(name: str) -> Iterator[None]:
    """A nested step of the current stage (a search candidate): the stage reads "outer > name" inside."""
    outer = _state["stage"], _state["operation"]
    stage(f"{outer[0]} > {name}")
    try:
        yield
    finally:
        _state["stage"], _state["operation"] = outer
        _write()


def _write() -> None:
    if _path is None:
        return
    # written whole and renamed: a crash mid-write leaves the previous breadcrumb, never half of one
    temporary = _path.with_suffix(".tmp")
    try:
        temporary.write_text(json.dumps(_state, default=str))
        os.replace(temporary, _path)
    except OSError:
        pass  # a full scratch folder must not fail the job over a breadcrumb


def read(folder: Path) -> dict[str, Any] | None:
    """The last breadcrumb left in `folder`, or None."""
    try:
        data = json.loads((folder / FILE_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
