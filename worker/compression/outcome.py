"""Plain-sentence warnings about a job's outcome that a user should read before trusting it.

A job can succeed and still gain next to nothing (pruned weights stored no smaller, an
int8 pass that only reached a small head), leave the layers that hold most of the weights
as they were (an LSTM left float by the TorchScript int8 path, convolutions skipped by the
codebook), or wreck the model (outputs no longer following the original). Each of these
is worth one sentence at the top of `metrics.warnings`; a real gain with good fidelity
gets none.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from worker.compression.metrics import storage_identity

GAIN_WARNING_BELOW = 1.1
COLLAPSED_AGREEMENT_BELOW = 0.5
COLLAPSED_SQNR_DB_BELOW = 0.0
# a layer type "holds most of the weights" above this share, and "was left untouched" when
# at least this share of its own weights is bit-for-bit what it was
MAJORITY_SHARE = 0.5
UNTOUCHED_SHARE = 0.9
# module classes that say nothing about the layer (containers of exported-program graphs)
GENERIC_TYPES = frozenset({"Module", "InterpreterModule", "GraphModule", "Sequential", "ModuleList", "ModuleDict"})

WEIGHT_RANK_TYPES = {3: "Conv1d", 4: "Conv2d", 5: "Conv3d"}

Fingerprint = tuple[Any, ...]


def layer_type(module: nn.Module) -> str:
    """The class name a user knows the module by (TorchScript modules keep it as `original_name`)."""
    if isinstance(module, torch.jit.ScriptModule):
        return str(getattr(module, "original_name", type(module).__name__))
    return type(module).__name__


def weight_fingerprints(model: nn.Module) -> dict[str, tuple[str, int, Fingerprint]]:
    """key -> (owning layer type, number of values, fingerprint) for each floating-point tensor;
    the owning layer's name is the key up to its last dot.

    A fingerprint (dtype, shape, sum, sum of magnitudes) instead of a copy: comparing models
    the size of the user's must not double the job's memory. Tied tensors count once.
    """
    owners = {name: layer_type(module) for name, module in model.named_modules()}
    figures: dict[str, tuple[str, int, Fingerprint]] = {}
    seen: set[tuple[Any, ...]] = set()
    for key, tensor in model.state_dict(keep_vars=False).items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.layout != torch.strided:
            continue
        identity = storage_identity(tensor)
        if identity in seen:
            continue
        seen.add(identity)
        owner = key.rsplit(".", 1)[0] if "." in key else ""
        kind = owners.get(owner, "Module")
        if kind in GENERIC_TYPES and key.endswith("weight"):
            # exported-program graphs keep weights on plain containers: name the layer by its weight's rank
            kind = WEIGHT_RANK_TYPES.get(tensor.dim(), kind)
        figures[key] = (kind, tensor.numel(), _fingerprint(tensor))
    return figures


def _fingerprint(tensor: torch.Tensor) -> Fingerprint:
    values = tensor.detach().double()
    return (tensor.dtype, tuple(tensor.shape), float(values.sum()), float(values.abs().sum()))


def untouched_majority(
    before: dict[str, tuple[str, int, Fingerprint]], after: nn.Module, left_alone: frozenset[str] = frozenset()
) -> tuple[str, float] | None:
    """(layer type, its share of all weights) when that type holds most of the weights and came out unchanged.

    A weight is unchanged when `after` holds it under the same key, bit for bit (same
    fingerprint), or when its layer is in `left_alone` (layers a stage reported it left as
    they were: frozen TorchScript results keep no per-layer state to compare).
    """
    total = sum(count for _, count, _ in before.values())
    if not total:
        return None
    now = {
        key: _fingerprint(tensor)
        for key, tensor in after.state_dict().items()
        # torchao's int8 tensor subclasses report a float dtype; they are changed weights, not float ones
        if type(tensor) in (torch.Tensor, nn.Parameter)
        and tensor.is_floating_point()
        and tensor.layout == torch.strided
    }
    held: dict[str, int] = {}
    kept: dict[str, int] = {}
    for key, (kind, count, fingerprint) in before.items():
        held[kind] = held.get(kind, 0) + count
        if now.get(key) == fingerprint or (key.rsplit(".", 1)[0] if "." in key else "") in left_alone:
            kept[kind] = kept.get(kind, 0) + count
    for kind, count in sorted(held.items(), key=lambda item: -item[1]):
        share = count / total
        if kind not in GENERIC_TYPES and share > MAJORITY_SHARE and kept.get(kind, 0) >= UNTOUCHED_SHARE * count:
            return kind, share
    return None


def outcome_warnings(ratio: float, fidelity: dict[str, Any], untouched: tuple[str, float] | None) -> list[str]:
    """Warnings for a finished job: little or no gain, the bulk of the model untouched, collapsed fidelity."""
    warnings = []
    if ratio <= 1.0:
        warnings.append(f"the artifact is not smaller than the original ({ratio:.2f}x)")
    elif ratio < GAIN_WARNING_BELOW:
        warnings.append(f"the artifact is only {ratio:.2f}x smaller than the original: next to no gain")
    if untouched is not None:
        kind, share = untouched
        warnings.append(
            f"{kind} layers hold {share:.0%} of the weights and were left unchanged: "
            f"this method does not reach them in this model"
        )
    agreement, sqnr = fidelity.get("top1_agreement"), fidelity.get("sqnr_db")
    collapsed = []
    if agreement is not None and agreement < COLLAPSED_AGREEMENT_BELOW:
        collapsed.append(f"top-1 agreement {agreement:.2f}")
    if sqnr is not None and sqnr < COLLAPSED_SQNR_DB_BELOW:
        collapsed.append(f"SQNR {sqnr:.1f} dB")
    if collapsed:
        warnings.append(
            "the compressed model's outputs no longer follow the original's ("
            + ", ".join(collapsed)
            + "): its fidelity collapsed"
        )
    return warnings
