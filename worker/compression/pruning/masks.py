"""Pruning masks: magnitude, random and N:M keep-masks, the cubic schedule, and holding masks while training."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

# ---------------------------------------------------------------- masks


def cubic_sparsity(step: int, steps: int, final: float, initial: float = 0.0) -> float:
    """Sparsity after `step` of `steps` on the cubic schedule of Zhu & Gupta (2017).

    s_t = s_f + (s_i - s_f) * (1 - t / n) ** 3, so early steps prune fast and late ones gently.

    Example:
        >>> [round(cubic_sparsity(t, 2, 0.8), 3) for t in (0, 1, 2)]
        [0.0, 0.7, 0.8]
    """
    return final + (initial - final) * (1.0 - step / steps) ** 3


def magnitude_masks(
    weights: Sequence[Tensor],
    amount: float,
    *,
    global_scope: bool = False,
    random: bool = False,
    previous: Sequence[Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """Boolean keep-masks that zero round(amount * n) weights of smallest |w| (or random ones).

    Args:
        weights: the weights to prune.
        amount: fraction of weights to zero, per weight or (global_scope) over all of them.
        global_scope: one threshold across all weights instead of one per weight.
        random: pick the weights at random instead of by magnitude.
        previous: masks already held; their zeros are pruned first, so masks only grow.
        generator: random source for `random`.
    Returns:
        One bool tensor per weight, True where the weight stays.
    Example:
        >>> magnitude_masks([torch.tensor([[1.0, -3.0], [0.5, 2.0]])], 0.5)[0]
        tensor([[False,  True],
                [False,  True]])
    """
    scores = []
    for index, weight in enumerate(weights):
        if random:
            score = torch.rand(weight.shape, generator=generator).to(weight.device)
        else:
            score = weight.detach().abs().float()
        if previous is not None:
            score = score.masked_fill(~previous[index].to(weight.device), -1.0)
        scores.append(score)
    if global_scope:
        flat = torch.cat([s.reshape(-1).cpu() for s in scores])
        keep = _keep_largest(flat, round(amount * flat.numel()))
        masks, offset = [], 0
        for weight in weights:
            masks.append(keep[offset : offset + weight.numel()].reshape(weight.shape).to(weight.device))
            offset += weight.numel()
        return masks
    return [_keep_largest(score, round(amount * score.numel())) for score in scores]


def nm_mask(weight: Tensor, n: int, m: int) -> Tensor:
    """Keep-mask with the n largest |w| of every m consecutive inputs of each output row.

    Inputs are dims 1.. flattened (in_channels x kernel for a conv).

    Example:
        >>> nm_mask(torch.tensor([[4.0, -1.0, 3.0, 0.5]]), 2, 4)
        tensor([[ True, False,  True, False]])
    """
    rows = weight.detach().reshape(weight.shape[0], -1)
    if rows.shape[1] % m:
        raise ValueError(f"{rows.shape[1]} inputs per output are not a multiple of {m}")
    groups = rows.abs().reshape(rows.shape[0], -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(weight.shape)


def _keep_largest(scores: Tensor, prune_count: int) -> Tensor:
    keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if prune_count > 0:
        drop = torch.topk(scores.reshape(-1), prune_count, largest=False).indices
        keep.view(-1)[drop] = False
    return keep


def _apply_masks(weights: Sequence[Tensor], masks: Sequence[Tensor]) -> None:
    with torch.no_grad():
        for weight, mask in zip(weights, masks):
            weight.masked_fill_(~mask.to(weight.device), 0.0)


def _mask_keeper(weights: Sequence[Tensor], masks: Sequence[Tensor]) -> Callable[[], None]:
    """after_step for the training loop: re-zero pruned weights after every optimizer step."""
    held = list(masks)

    def reapply() -> None:
        with torch.no_grad():
            for index, weight in enumerate(weights):
                if held[index].device != weight.device:
                    held[index] = held[index].to(weight.device)
                weight.masked_fill_(~held[index], 0.0)

    return reapply
