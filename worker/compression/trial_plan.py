"""Which schemes are tried on an upload, and the trials' results as files and records: no torch here,
so the worker's supervisor (worker.runner) reads them too. worker.compression.scheme_trials runs them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from worker.compression.errors import summarize_error

# the schemes most jobs start with; the rest run without a trial and explain a failure in the job
TRIAL_STAGES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("quantize", "dynamic_int8", {}),
    ("quantize", "static_int8", {}),
    ("quantize", "fp16", {}),
    ("prune", "ln_structured", {"amount": 0.3}),
    ("prune", "l1_unstructured", {"amount": 0.5}),
)
# above this many parameters the trials would cost more than the upload's inspection is worth
TRIAL_MAX_PARAMETERS = 30_000_000
TRIALS_FILE = "trials.json"
REASON_CHARACTERS = 600


def trial_key(method: str, scheme: str) -> str:
    return f"{method}:{scheme}"


ALL_TRIALS = tuple(trial_key(method, scheme) for method, scheme, _ in TRIAL_STAGES)


def trial_inputs(
    declared: list[dict[str, Any]] | None, inspection: dict[str, Any] | None
) -> list[dict[str, Any]] | None:
    """The inputs to try the schemes with: those declared (at upload, or read from a Hugging Face config),
    else an exported program's float placeholders (symbolic sizes as dynamic dimensions of size 1).
    None when they are not known: integer inputs need a declared value range."""
    found = inspection or {}
    if declared:
        return declared
    if found.get("declared_inputs"):
        return list(found["declared_inputs"])
    signature = found.get("input_signature")
    if found.get("kind") != "graph" or not isinstance(signature, list) or not signature:
        return None
    inputs = []
    for entry in signature:
        if entry.get("dtype") not in ("torch.float32", "float32"):
            return None
        shape = [int(d) if str(d).isdigit() else 1 for d in entry["shape"]]
        dynamic = [i for i, d in enumerate(entry["shape"]) if not str(d).isdigit()]
        inputs.append({"name": entry["name"], "shape": shape, "dtype": "float32", "dynamic": dynamic})
    return inputs


def short_reason(text: str) -> str:
    """A trial's failure as the 422 quotes it: the recognised hint and the real cause, on one line."""
    return " ".join(summarize_error(text, REASON_CHARACTERS).split())


def crashed(detail: str) -> dict[str, Any]:
    """The result of a trial whose process died natively."""
    return {"ok": False, "reason": short_reason(detail), "crashed": True}


def write_progress(
    scratch: Path, results: dict[str, dict[str, Any]], trying: str | None, skipped: str | None = None
) -> None:
    # written whole and renamed, so a crash never leaves half a file
    path = scratch / TRIALS_FILE
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({"results": results, "trying": trying, "skipped": skipped}, default=str))
    partial.replace(path)


def read_progress(scratch: Path) -> tuple[dict[str, dict[str, Any]], str | None, str | None]:
    """What a (possibly crashed) trial child wrote: results so far, the trial in progress, why none ran."""
    path = scratch / TRIALS_FILE
    if not path.exists():
        return {}, None, None
    data = json.loads(path.read_text())
    return dict(data["results"]), data.get("trying"), data.get("skipped")
