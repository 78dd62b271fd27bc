"""The worker's side of the upload trials: each main scheme tried on a new model in its own sandbox.

worker.compression.scheme_trials runs the trials in a sandboxed child; a child that crashes natively
costs only the scheme it was trying (the crash is that scheme's result) and a fresh child takes the rest.
The results go into the model's inspection, where the API reads its refusals at submit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker.compression.trial_plan import ALL_TRIALS, TRIAL_MAX_PARAMETERS, crashed, read_progress, trial_inputs
from worker.sandbox import run_sandboxed
from worker.slots import sandbox_slot, slot_limits

log = logging.getLogger("modelpress.runner")

TRIALS_WALL_SECONDS = 600


def try_schemes(
    model_id: str,
    fetch_model: Callable[[Path], dict[str, Any]],
    declared_inputs: list[dict[str, Any]] | None,
    inspection: dict[str, Any],
    isolation: str,
    forward_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """{"results": {"method:scheme": {...}}} for the trials that ran, or {"skipped": why none did}.

    `fetch_model(folder)` puts the upload into a sandbox's folder and returns its model reference;
    `forward_kwargs` are the constant arguments declared with the upload.
    """
    inputs = trial_inputs(declared_inputs, inspection)
    if inputs is None:
        return {"skipped": "its inputs are not known: declare them at upload (inputs) to have the schemes tried"}
    if int(inspection.get("parameters") or 0) > TRIAL_MAX_PARAMETERS:
        return {"skipped": f"it has more than {TRIAL_MAX_PARAMETERS:,} parameters: trials would cost too long"}
    results: dict[str, dict[str, Any]] = {}
    remaining = list(ALL_TRIALS)
    limits = slot_limits(wall_seconds=TRIALS_WALL_SECONDS)
    while remaining:
        with sandbox_slot(f"trial-{model_id}-{len(results)}", limits) as (scratch, warm):
            request = dict(fetch_model(scratch), inputs=inputs, forward_kwargs=forward_kwargs, schemes=remaining)
            outcome = run_sandboxed("trial", request, scratch, limits, isolation=isolation, warm=warm)
            done, trying, skipped = read_progress(scratch)
        if skipped:
            return {"skipped": f"it does not run on its declared inputs alone ({skipped})"}
        results.update(done)
        if outcome.ok:
            break
        detail = str((outcome.error or {}).get("detail") or "the trial process failed")
        if trying is None:  # it failed outside any one trial: refuse nothing on its account
            log.warning("model %s: scheme trials stopped: %s", model_id, detail)
            return {"results": results, "stopped": detail[:600]}
        results[trying] = crashed(detail)
        remaining = [key for key in remaining if key not in results]
    return {"results": results}
