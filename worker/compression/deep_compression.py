"""Encode stage, scheme `codebook`, delivered as the weights-only `deep_compression` container.

Han et al.'s three stages end here: the pruned model's Linear layers are k-means
weight-shared (centroids rounded to fp16, so the container stores them exactly),
the shared centroids are optionally fine-tuned with the training set as in the
paper (one gradient per centroid: the sum over the weights that share it), biases
are rounded to fp16, and the model stays an eager module whose weights take at
most 2^bits distinct nonzero values per layer. `save_artifact` then writes it with
`modelpress.deep_compression_format.encode`, which Huffman-codes the cluster codes
and the relative sparse index; the pipeline measures the model decoded back from
that file. `codebook.run_stage` sends eager models here unless the job asks for
output_format "torchscript".
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from worker.compression.base import Dataset, EngineError, StageContext, StageResult, select_layers
from worker.compression.codebook import kmeans_share
from worker.compression.inputs import Batch

__all__ = ["share_weights", "finetune_centroids", "run_weights_stage"]

CONTAINER_FORMAT = "deep_compression"
CENTROID_LR = 1e-4
BATCH_SIZE = 64


class _SharedLayer:
    """One Linear's sharing: where its nonzeros are, their cluster codes and the fp16-exact codebook."""

    def __init__(self, name: str, module: nn.Linear, bits: int) -> None:
        weight = module.weight.detach().float().cpu()
        self.name, self.module, self.shape = name, module, weight.shape
        self.positions = torch.nonzero(weight.flatten()).flatten()
        values = weight.flatten()[self.positions]
        if values.numel() == 0:
            self.codebook, self.codes = torch.zeros(1), torch.zeros(0, dtype=torch.long)
        else:
            self.codebook, self.codes = kmeans_share(values, 1 << bits)
        self.codebook = self.codebook.half().float()
        self.original = weight

    def weight(self, codebook: Tensor) -> Tensor:
        flat = torch.zeros(self.shape.numel(), dtype=codebook.dtype, device=codebook.device)
        flat = flat.index_put((self.positions.to(codebook.device),), codebook[self.codes.to(codebook.device)])
        return flat.view(self.shape)


def share_weights(model: nn.Module, layers: list[tuple[str, nn.Linear]], bits: int) -> list[_SharedLayer]:
    return [_SharedLayer(name, module, bits) for name, module in layers]


def finetune_centroids(
    model: nn.Module, shared: list[_SharedLayer], data: Dataset, epochs: int, ctx: StageContext
) -> dict[str, Any]:
    """Han et al.'s centroid fine-tuning: cross-entropy on the training set, gradients flow into
    each codebook (and bias); pruned weights stay zero and every layer keeps 2^bits values.
    Keeps the fine-tuned codebooks only when training accuracy does not drop."""
    labels = data.labels
    if labels is None:
        raise EngineError("finetune_epochs needs a training dataset with labels")
    generator = torch.Generator().manual_seed(ctx.seed)
    codebooks = [nn.Parameter(layer.codebook.clone()) for layer in shared]
    biases = {
        f"{layer.name}.bias": nn.Parameter(layer.module.bias.detach().float().clone())
        for layer in shared
        if layer.module.bias is not None
    }
    optimizer = torch.optim.Adam(codebooks + list(biases.values()), lr=CENTROID_LR)

    def forward(inputs: Batch) -> Tensor:
        weights = {f"{layer.name}.weight": layer.weight(book) for layer, book in zip(shared, codebooks)}
        logits: Tensor = functional_call(model, {**weights, **biases}, (inputs,))
        return logits

    def train_accuracy() -> float:
        with torch.no_grad():
            return float((forward(data.inputs).argmax(1) == labels).float().mean())

    before = train_accuracy()
    start = [book.detach().clone() for book in codebooks]
    start_biases = {name: bias.detach().clone() for name, bias in biases.items()}
    losses = []
    model.train()
    for epoch in range(epochs):
        ctx.check_cancelled()
        order = torch.randperm(len(data), generator=generator)
        total = 0.0
        for begin in range(0, len(data), BATCH_SIZE):
            batch = order[begin : begin + BATCH_SIZE]
            loss = F.cross_entropy(forward(data.inputs[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves this unannotated
            optimizer.step()
            with torch.no_grad():  # the container stores fp16 centroids and biases: train on what it will hold
                for parameter in codebooks + list(biases.values()):
                    parameter.copy_(parameter.half().float())
            total += float(loss.detach()) * len(batch)
        losses.append(round(total / len(data), 6))
        ctx.progress(0.1 + 0.7 * (epoch + 1) / epochs, f"centroid fine-tuning epoch {epoch + 1}/{epochs}")
    model.eval()
    after = train_accuracy()
    kept = after >= before
    if not kept:
        with torch.no_grad():
            for book, original in zip(codebooks, start):
                book.copy_(original)
            for name, original in start_biases.items():
                biases[name].copy_(original)
    for layer, book in zip(shared, codebooks):
        layer.codebook = book.detach().clone()
    for layer in shared:
        if layer.module.bias is not None:
            layer.module.bias.data.copy_(biases[f"{layer.name}.bias"].detach())
    return {
        "epochs": epochs,
        "lr": CENTROID_LR,
        "losses": losses,
        "train_accuracy_before": round(before, 6),
        "train_accuracy_after": round(after, 6),
        "kept": kept,
    }


def run_weights_stage(model: nn.Module, options: dict[str, Any], ctx: StageContext) -> StageResult:
    """Share the chosen Linear layers' weights in place; the result prefers the deep_compression format.

    `options` are the encode/codebook stage's, every default filled in (codebook.run_stage)."""
    bits = int(options["bits"])
    min_sparsity = float(options["min_sparsity"])
    include_classifier = bool(options["prune_classifier"])
    epochs = int(options["finetune_epochs"])
    model = model.cpu().eval()
    chosen: list[tuple[str, nn.Linear]] = []
    skipped: list[dict[str, Any]] = []
    for name, module in select_layers(model, options.get("layers"), include_classifier=include_classifier):
        if not isinstance(module, nn.Linear):
            skipped.append({"layer": name, "reason": f"{type(module).__name__} is not encoded (Linear only)"})
            continue
        sparsity = 1 - int(torch.count_nonzero(module.weight)) / module.weight.numel()
        if sparsity < min_sparsity:
            skipped.append({"layer": name, "reason": f"sparsity {sparsity:.3f} < min_sparsity {min_sparsity}"})
            continue
        chosen.append((name, module))
    if not chosen:
        raise EngineError(
            "no layer was encoded: "
            + ("; ".join(f"{s['layer']}: {s['reason']}" for s in skipped) or "no Linear layer chosen")
        )
    ctx.progress(0.05, "k-means weight sharing")
    shared = share_weights(model, chosen, bits)
    finetune = None
    if epochs > 0:
        if ctx.train_data is None:
            raise EngineError("finetune_epochs needs a training dataset")
        finetune = finetune_centroids(model, shared, ctx.train_data, epochs, ctx)
    rows = []
    signal = noise = 0.0
    with torch.no_grad():
        for layer in shared:
            weight = layer.weight(layer.codebook)
            signal += float(layer.original.double().pow(2).sum())
            noise += float((layer.original.double() - weight.double()).pow(2).sum())
            layer.module.weight.copy_(weight)
            if layer.module.bias is not None:  # the container stores biases as fp16
                layer.module.bias.copy_(layer.module.bias.half().float())
            rows.append(
                {
                    "layer": layer.name,
                    "bits": bits,
                    "clusters": int(layer.codebook.numel()),
                    "sparsity": round(1 - layer.positions.numel() / layer.shape.numel(), 6),
                    "sqnr_db": _sqnr_db(layer.original, weight),
                }
            )
    info: dict[str, Any] = {
        "scheme": "codebook",
        "bits": bits,
        "container": CONTAINER_FORMAT,
        "layers": rows,
        "skipped": skipped,
        "weight_sqnr_db": round(10 * math.log10(signal / noise), 3) if noise > 0 else float("inf"),
    }
    if finetune is not None:
        info["centroid_finetune"] = finetune
    ctx.progress(1.0, "weights shared")
    return StageResult(model=model, kind="eager", info=info, preferred_output_format=CONTAINER_FORMAT)


def _sqnr_db(reference: Tensor, approx: Tensor) -> float:
    noise = float((reference.double() - approx.double()).pow(2).sum())
    signal = float(reference.double().pow(2).sum())
    return round(10 * math.log10(signal / noise), 3) if noise > 0 else float("inf")
