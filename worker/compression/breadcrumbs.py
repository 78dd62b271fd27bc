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
# The file is one page, rewritten in place by a single pwrite at offset 0 and padded with spaces (JSON ignores
# them): a dying process never leaves such a write half done (the kernel copies a write page by page and takes
# a fatal signal only between pages). Writing a temporary file and renaming it over the last one cost 2-3 ms per
# breadcrumb on ext4 (a rename over an existing file starts writeback of the new one), 3 us this way: the service
# benchmark's ~10 s distillation job leaves about 200 (four per epoch), for a file read only after a crash.
RECORD_BYTES = 4096
TRIMMED_CHARS = 300  # a stage or operation text longer than a record allows is cut to this

_file: int | None = None  # the open breadcrumb file, while one is set
_state: dict[str, Any] = {"stage": "starting", "operation": "importing the engine", "model": {}}


def leave_in(folder: Path) -> None:
    """Write breadcrumbs to `folder`/breadcrumbs.json from now on, starting a fresh record (nothing of an
    earlier job run in this process carries over)."""
    global _file
    _state.update(stage="starting", operation="importing the engine", model={})
    if _file is not None:
        os.close(_file)
        _file = None
    try:
        _file = os.open(folder / FILE_NAME, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError:
        return  # no breadcrumbs, as with a full scratch folder: a crash is then reported without them
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


def _record() -> bytes:
    record = json.dumps(_state, default=str).encode()
    if len(record) > RECORD_BYTES:  # many model facts or a very long text: where the job was still fits
        cut = {key: str(_state[key])[:TRIMMED_CHARS] for key in ("stage", "operation")}
        record = json.dumps({**cut, "model": {}}).encode()  # 6 bytes a character at most: below one page
    return record.ljust(RECORD_BYTES)


def _write() -> None:
    if _file is None:
        return
    try:
        os.pwrite(_file, _record(), 0)
    except OSError:
        pass  # a full scratch folder must not fail the job over a breadcrumb


def read(folder: Path) -> dict[str, Any] | None:
    """The last breadcrumb left in `folder`, or None."""
    try:
        data = json.loads((folder / FILE_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
