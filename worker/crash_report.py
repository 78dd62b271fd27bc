"""What the parent says when the sandboxed child died by a native crash.

The child leaves breadcrumbs (worker.compression.breadcrumbs: the stage, the operation, facts of
the model) and a faulthandler dump (the Python frames of every thread at the moment of the
signal) in its scratch folder. From those and the child's last stderr line (glibc's own words,
such as "corrupted double-linked list"), `native_crash_error` builds the job's error: the
stage, the operation, the signal's name, the top frames and a hint. Such a crash is
deterministic for the same job, so the error says it is not retryable.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Any

from worker.compression import breadcrumbs

FAULTHANDLER_FILE = "faulthandler.log"
NATIVE_SIGNALS = {
    "SIGSEGV": "segmentation fault",
    "SIGBUS": "bus error",
    "SIGABRT": "abort",
    "SIGILL": "illegal instruction",
    "SIGFPE": "floating-point exception",
}
TOP_FRAMES = 8
_FRAME = re.compile(r'File "([^"]+)", line (\d+) in (\S+)')


def crash_signal(code: int) -> str | None:
    """The native crash signal's name for a child's exit code (bwrap reports 128 + n), else None."""
    number = -code if code < 0 else code - 128 if code > 128 else 0
    if number <= 0 or number not in signal.valid_signals():
        return None
    name = signal.Signals(number).name
    return name if name in NATIVE_SIGNALS else None


def python_frames(folder: Path, limit: int = TOP_FRAMES) -> list[str]:
    """The crashing thread's innermost Python frames, innermost first ("file:line in function")."""
    try:
        text = (folder / FAULTHANDLER_FILE).read_text(errors="replace")
    except OSError:
        return []
    # faulthandler prints the current thread first ("Current thread ... (most recent call first):")
    blocks = re.split(r"\n(?=(?:Current thread|Thread) 0x)", text)
    current = next((b for b in blocks if "Current thread" in b), blocks[0] if blocks else "")
    frames = [f"{Path(file).name}:{line} in {function}" for file, line, function in _FRAME.findall(current)]
    return frames[:limit]


def hint(stage: str, operation: str, model: dict[str, Any]) -> str:
    """What to try instead, for the crash's stage, operation and model."""
    where = f"{stage} {operation}".lower()
    # the job's quantization may crash later than its own stage: when its artifact is run or saved
    quantized = "int8" in where or "quantiz" in where or any("int8" in str(s) for s in model.get("stages") or [])
    if model.get("recurrent") and quantized:
        return (
            "recurrent layers (LSTM/GRU) in int8 are a known native crash of torch's quantized kernels on "
            "exported graphs: try dynamic_int8 on the eager or TorchScript form of the model, or leave the "
            "recurrent layers out with skip_layers"
        )
    if "export" in where or "onnx" in where or "lower" in where:
        return (
            "the exporter crashed natively on this model: try another output_format or target runtime, or "
            "upload the model in another format"
        )
    if "load" in where:
        return "the model file crashed the loader: re-save it with the same torch version and upload it again"
    if "int8" in where or "quantiz" in where or "calibrat" in where:
        return (
            "torch's int8 kernels crashed on one of the model's layers: try another scheme (fp16, dynamic_int8), "
            "or leave the failing layers out with skip_layers"
        )
    return (
        "the crash happened in native code (torch or an extension) while running this step; the same job "
        "would crash again, so change the scheme or the model rather than resubmitting"
    )


def native_crash_error(code: int, folder: Path, stderr_tail: str) -> dict[str, Any] | None:
    """The job's error for a child that died by a native crash signal, else None."""
    name = crash_signal(code)
    if name is None:
        return None
    crumb = breadcrumbs.read(folder) or {}
    stage = str(crumb.get("stage") or "unknown")
    operation = str(crumb.get("operation") or "unknown")
    model = crumb.get("model") if isinstance(crumb.get("model"), dict) else {}
    frames = python_frames(folder)
    native_message = _native_message(stderr_tail)
    advice = hint(stage, operation, model or {})
    detail = (
        f"the sandboxed process crashed with {name} ({NATIVE_SIGNALS[name]}) in stage {stage!r} while {operation!r}"
    )
    if native_message:
        detail += f" ({native_message})"
    if frames:
        detail += f"; innermost Python frame: {frames[0]}"
    detail += f". Hint: {advice}. The crash is deterministic for this job, so it was not retried"
    error: dict[str, Any] = {
        "error": "NativeCrash",
        "detail": detail,
        "signal": name,
        "stage": stage,
        "operation": operation,
        "frames": frames,
        "hint": advice,
        "retryable": False,
    }
    if native_message:
        error["native_message"] = native_message
    return error


# glibc's and the C++ runtime's own last words on stderr before an abort
_NATIVE_WORDS = re.compile(
    r"corrupted|double free|free\(\)|malloc|munmap_chunk|stack smashing|terminate called|Assertion .* failed|"
    r"Segmentation fault|Bus error|Aborted|Illegal instruction",
    re.I,
)


def _native_message(stderr_tail: str) -> str | None:
    """The last stderr line in the C library's or C++ runtime's own words, if any."""
    for line in reversed(stderr_tail.strip().splitlines()):
        if _NATIVE_WORDS.search(line):
            return line.strip()[:300]
    return None
