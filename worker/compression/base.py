"""Shared types of the engine: what a stage receives and returns.

The engine imports torch and nothing of the web, database or queue.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from modelpress.configs import config_class

if TYPE_CHECKING:
    from worker.compression.inputs import Batch, Signature

# eager: a plain nn.Module (registered architecture); graph: the module of an
# exported program (eager-like, trainable); torchscript: a ScriptModule.
ModelKind = Literal["eager", "graph", "torchscript"]


class EngineError(Exception):
    """A failure the user can act on; its message ends up in the job's error detail."""


class JobCancelled(Exception):
    """Raised by `StageContext.check_cancelled` when the user cancelled the job."""


@dataclass
class Dataset:
    """Tensors of an uploaded dataset: inputs (first axis = samples) and optional int labels.

    `inputs` is one tensor, or a `ModelInputs` when the model takes several named inputs or
    constant arguments; both slice along the samples.
    """

    inputs: Batch
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.inputs)


def _ignore_progress(fraction: float, message: str) -> None:
    return None


def _ignore_event(kind: str, data: dict[str, Any]) -> None:
    return None


def _never_cancelled() -> None:
    return None


@dataclass
class StageContext:
    """Everything a stage may use besides the model itself."""

    kind: ModelKind
    example_input: Batch
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    train_data: Dataset | None = None
    eval_data: Dataset | None = None
    # progress(fraction_of_this_stage in [0, 1], short message)
    progress: Callable[[float, str], None] = _ignore_progress
    # event(kind, data): per-epoch figures, log lines
    event: Callable[[str, dict[str, Any]], None] = _ignore_event
    # raises JobCancelled when the job was cancelled; call it every epoch / N batches
    check_cancelled: Callable[[], None] = _never_cancelled
    seed: int = 0
    # other uploaded models a stage refers to (distillation students), by id -> loaded module and kind
    extra_models: dict[str, tuple[nn.Module, ModelKind]] = field(default_factory=dict)
    # bytes of the file the user uploaded: what "smaller" is measured against (None: unknown)
    original_size_bytes: int | None = None
    # the declared forward call (inputs, constant arguments, scored output); None for the shorthand
    signature: Signature | None = None
    # the output format the job asked for (None: the stages' preference)
    output_format: str | None = None
    # threads the artifact will run at, and the runtime that serves it (torch, onnxruntime, executorch)
    threads: int = 1
    runtime: str = "torch"


def with_defaults(method: str, scheme: str, options: dict[str, Any]) -> dict[str, Any]:
    """`options` over the defaults of the scheme's typed config (modelpress.configs), the engine's only
    source of option defaults: callers may give some options only (the engine tests do)."""
    return {**config_class(method, scheme).default_options(), **options}


@dataclass
class StageResult:
    model: nn.Module
    kind: ModelKind
    # free-form figures for metrics.stages[i] (per-layer tables, baselines, ...)
    info: dict[str, Any] = field(default_factory=dict)
    # an output format this stage's result is best stored in (e.g. sparse_state_dict)
    preferred_output_format: str | None = None
    # extra Python packages needed to load the artifact (e.g. "torchao")
    requires: list[str] = field(default_factory=list)


def select_layers(
    model: nn.Module, layers: dict[str, list[str]] | None, *, include_classifier: bool
) -> list[tuple[str, nn.Module]]:
    """Modules that own a matrix-like `weight` (Linear, Conv, and their TorchScript or
    exported-graph counterparts), filtered by include/exclude globs on module names.

    The last such module in definition order is taken to be the classifier and
    is left out unless `include_classifier` is set.

    Example:
        >>> select_layers(model, {"exclude": ["features.0"]}, include_classifier=False)
    """
    include = (layers or {}).get("include") or ["*"]
    exclude = (layers or {}).get("exclude") or []
    candidates = [(name, module) for name, module in model.named_modules() if _owns_matrix_weight(module)]
    if candidates and not include_classifier:
        candidates = candidates[:-1]
    return [
        (name, module)
        for name, module in candidates
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in include)
        and not any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)
    ]


def _owns_matrix_weight(module: nn.Module) -> bool:
    # Exported-program graph modules keep parameters on plain container modules,
    # and ScriptModules are not nn.Linear instances, so go by the parameter itself.
    if isinstance(module, torch.jit.ScriptModule):
        weight = getattr(module, "weight", None) if hasattr(module, "weight") else None
    else:
        weight = module._parameters.get("weight")
    return isinstance(weight, torch.Tensor) and weight.dim() >= 2 and not isinstance(module, nn.Embedding)
