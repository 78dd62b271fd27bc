"""What a warm sandboxed child does before its job exists: imports and first calls on models of its own.

Each step is paid while the worker slot is idle instead of on the job's wall time; none touches any job's
request or files (the job's line has not been sent yet). worker.sandbox runs them in `_warm_main`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

# Imported by the engine only on first use, yet by most jobs that train or export: torch.optim's first
# optimizer and torch.export import torch._dynamo (1.6 s of a 2.2 s small distillation job measured in a fresh
# child, more on a loaded box). A warm child pays for them before its job exists. The method modules that
# worker.compression.handlers imports when a stage runs follow (about 0.1 s together, no extension loading),
# and the upload trials' runner (warm children serve trials too).
PREWARM_MODULES = (
    "torch._dynamo",
    "torch.export",
    "torch.utils.flop_counter",
    "torch_pruning",
    "worker.compression.pruning",
    "worker.compression.quantization",
    "worker.compression.distillation",
    "worker.compression.search",
    "worker.compression.codebook",
    "worker.compression.sensitivity",
    "worker.compression.scheme_trials",
)


def job_waiting() -> bool:
    """True when the supervisor has sent the job line (or closed stdin)."""
    import select

    return bool(select.select([sys.stdin], [], [], 0)[0])


def prewarm_steps() -> list[Callable[[], None]]:
    import importlib

    def load(name: str) -> Callable[[], None]:
        def step() -> None:
            try:
                importlib.import_module(name)
            except Exception:  # an optional library missing here: the job reports it if it needs it
                pass

        return step

    return [load(name) for name in PREWARM_MODULES] + [_first_calls, _first_export]


def _first_calls() -> None:
    """One tiny train step and TorchScript trace on a model made here (first-call setup of autograd, the
    optimizer and the profiling executor). Nothing of any job is involved: its request does not exist yet."""
    import warnings

    import torch
    from torch import nn

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    inputs = torch.randn(4, 8)
    loss = nn.functional.cross_entropy(model(inputs), torch.zeros(4, dtype=torch.long))
    loss.backward()  # type: ignore[no-untyped-call]  # torch's backward has no annotations
    optimizer.step()
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # deprecation notes of this trace, not of any job
        traced = torch.jit.trace(model.eval(), inputs)  # type: ignore[no-untyped-call]  # untyped in torch
        for _ in range(3):
            traced(inputs)


def _first_export() -> None:
    """torch.export of a tiny model made here, with a dynamic batch as the engine exports artifacts, saved,
    loaded back (in memory) and run. Exported programs are the default artifact of eager models, so most jobs end
    on this path, and its first call in a process imports torch.export's tracer and AOTAutograd and fills
    sympy's caches for the symbolic batch: 0.8 s of CPU measured here (0.1 s once paid), which the service
    benchmark's job paid after training, on its wall time, where the in-process run had paid it before."""
    import io

    import torch
    from torch import nn

    from worker.compression.inputs import export_within_model_bounds
    from worker.compression.io import MAX_BATCH

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    batch = ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)
    program = export_within_model_bounds(model, (torch.randn(2, 8),), None, batch)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()
    with torch.inference_mode():
        loaded(torch.randn(3, 8))
