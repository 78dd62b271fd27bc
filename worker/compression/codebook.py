"""Encode stage, scheme `codebook`: Han et al.'s weight sharing and sparse storage (Deep Compression, 2016).

For every chosen Linear layer of an already pruned model:

1. k-means over the layer's NONZERO weights, 2^bits clusters, centroids initialised
   linearly over [min, max] (Han et al.'s best initialisation), Lloyd iterations in
   torch; pruned weights stay exactly zero.
2. The layer becomes a `CodebookLinear`, a TorchScript-able module that serialises
   only: the float32 codebook, the bias, the cluster code of each nonzero packed at
   `bits` bits, and where the nonzeros are, as whichever is smaller for the layer:
   Han et al.'s relative index (gaps packed at 2..8 bits; a 0 entry is a filler that
   advances 2^b - 1 positions without a weight) or a bitmask. A layer is two tensors
   (two records in the archive): float32 [codebook | bias] and uint8 [codes | index];
   TorchScript cannot reinterpret bytes as floats (no `Tensor.view(dtype)`).
3. The whole model is scripted (traced when scripting fails), so the artifact is a
   TorchScript file that stock `torch.jit.load` runs without ModelPress.

The dense weight is decoded ONCE, in `__setstate__` when the archive is loaded (and
when the stage builds the module), and kept as a plain attribute that `__getstate__`
leaves out of the file; forward is a plain `F.linear`, as fast as the float layer.
This is how torch's own quantized modules keep packed weights out of the state.

Only eager models and exported programs (lifted to torch-level modules) are encoded:
a TorchScript upload's layer types are compiled into its parents and cannot be
swapped for another class, so the catalogue accepts EAGER_FORMATS only.
Conv layers are not encoded (left as they are); `info["skipped"]` lists them.
"""

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worker.compression.base import EngineError, StageContext, StageResult, select_layers, with_defaults
from worker.compression.inputs import Batch

__all__ = ["CodebookLinear", "encode_layer", "kmeans_share", "run_stage"]

KMEANS_ITERATIONS = 30
# header layout of a CodebookLinear: out, in, clusters, has_bias, code_bits, index_kind, index_bits, nnz, entries
_HEADER = 9


def kmeans_share(values: Tensor, clusters: int, iterations: int = KMEANS_ITERATIONS) -> tuple[Tensor, Tensor]:
    """1-D k-means with linear initialisation over [min, max]; returns (codebook float32 [K], codes int64).

    Centroids stay sorted, so assignment is a bucketize against the midpoints. A
    cluster that loses all its members keeps its previous centroid.
    """
    values = values.detach().float().flatten()
    if values.numel() == 0:
        raise EngineError("k-means needs at least one value")
    clusters = max(1, min(clusters, values.numel()))
    low, high = float(values.min()), float(values.max())
    centroids = torch.linspace(low, high, clusters, dtype=torch.float64)
    data = values.double()
    codes = torch.zeros_like(data, dtype=torch.long)
    for _ in range(iterations):
        codes = torch.bucketize(data, (centroids[1:] + centroids[:-1]) / 2)
        sums = torch.zeros(clusters, dtype=torch.float64).index_add_(0, codes, data)
        counts = torch.bincount(codes, minlength=clusters).double()
        updated = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        updated, _ = torch.sort(updated)
        if torch.equal(updated, centroids):
            break
        centroids = updated
    codes = torch.bucketize(data, (centroids[1:] + centroids[:-1]) / 2)
    return centroids.float(), codes


def _pack(values: Tensor, bits: int) -> Tensor:
    """Little-endian bit packing of non-negative ints < 2^bits into uint8."""
    if values.numel() == 0:
        return torch.zeros(0, dtype=torch.uint8)
    shifts = torch.arange(bits, dtype=torch.long)
    stream = ((values.long().unsqueeze(1) >> shifts) & 1).flatten()
    pad = (-stream.numel()) % 8
    stream = torch.cat([stream, torch.zeros(pad, dtype=torch.long)]).view(-1, 8)
    return (stream << torch.arange(8, dtype=torch.long)).sum(1).to(torch.uint8)


@torch.jit.script
def _unpack(data: Tensor, bits: int, count: int) -> Tensor:
    stream = ((data.long().unsqueeze(1) >> torch.arange(8)) & 1).flatten()
    return (stream[: count * bits].view(count, bits) << torch.arange(bits)).sum(1)


def _relative_index(positions: Tensor, index_bits: int) -> Tensor:
    """Gaps between successive nonzero positions (from -1); gaps above 2^b - 1 get filler 0 entries."""
    limit = (1 << index_bits) - 1
    gaps = torch.diff(positions, prepend=torch.tensor([-1]))
    fillers = (gaps - 1) // limit
    if int(fillers.sum()) == 0:
        return gaps
    remainders = gaps - fillers * limit
    entries = []
    for filler, remainder in zip(fillers.tolist(), remainders.tolist()):
        entries.extend([0] * filler)
        entries.append(remainder)
    return torch.tensor(entries, dtype=torch.long)


class CodebookLinear(nn.Module):
    """A Linear layer stored as shared weights: codebook + packed codes + sparse index + bias.

    `floats` (float32) holds [codebook | bias], `data` (uint8) holds [packed codes |
    packed index] and `header` says how to read them. Only these three (and
    `training`) are serialised; `weight` is decoded from them on load.
    """

    bias: Tensor | None
    header: list[int]

    def __init__(self, floats: Tensor, data: Tensor, header: list[int]) -> None:
        super().__init__()
        self.floats = floats
        self.data = data
        self.header = header
        self.weight = self.decode()
        self.bias = self._bias()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def _bias(self) -> Tensor | None:
        h = self.header
        if h[3] == 0:
            return None
        return self.floats[h[2] :]

    @torch.jit.export
    def decode(self) -> Tensor:
        h = self.header
        out, inp, nnz = h[0], h[1], h[7]
        code_bytes = (nnz * h[4] + 7) // 8
        codes = _unpack(self.data[:code_bytes], h[4], nnz)
        index = self.data[code_bytes:]
        if h[5] == 0:  # relative index; 0 = filler advancing 2^b - 1 positions
            gaps = _unpack(index, h[6], h[8])
            steps = torch.where(gaps == 0, (1 << h[6]) - 1, gaps)
            positions = (torch.cumsum(steps, 0) - 1)[gaps != 0]
        else:  # bitmask
            positions = torch.nonzero(_unpack(index, 1, out * inp)).flatten()
        weight = torch.zeros(out * inp)
        weight[positions] = self.floats[: h[2]][codes]
        return weight.view(out, inp)

    @torch.jit.export
    def __getstate__(self) -> tuple[Tensor, Tensor, list[int], bool]:
        return (self.floats, self.data, self.header, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[Tensor, Tensor, list[int], bool]) -> None:
        self.floats = state[0]
        self.data = state[1]
        self.header = state[2]
        self.training = state[3]
        self.weight = self.decode()
        self.bias = self._bias()


def encode_layer(weight: Tensor, bias: Tensor | None, bits: int) -> tuple[CodebookLinear, Tensor, dict[str, Any]]:
    """k-means-share `weight`'s nonzeros and build its CodebookLinear; returns (module, shared weight, figures)."""
    weight = weight.detach().float().cpu()
    out, inp = weight.shape
    flat = weight.flatten()
    positions = torch.nonzero(flat).flatten()
    nnz = positions.numel()
    if nnz == 0:
        codebook, codes = torch.zeros(1), torch.zeros(0, dtype=torch.long)
    else:
        codebook, codes = kmeans_share(flat[positions], 1 << bits)
    shared = torch.zeros_like(flat)
    shared[positions] = codebook[codes]
    # Where the nonzeros are: the smallest of the relative index at 2..8 bits and a bitmask.
    options: list[tuple[int, int, int, int, Tensor | None]] = [(math.ceil(out * inp / 8), 1, 1, out * inp, None)]
    for index_bits in range(2, 9):
        relative = _relative_index(positions, index_bits)
        options.append((math.ceil(relative.numel() * index_bits / 8), 0, index_bits, relative.numel(), relative))
    index_bytes, kind, index_bits, count, entries = min(options, key=lambda o: o[0])
    # the bitmask (kind 1) is the only option without relative-index entries
    index = _pack((flat != 0).long(), 1) if kind == 1 or entries is None else _pack(entries, index_bits)
    floats = torch.cat([codebook] + ([bias.detach().float().cpu().flatten()] if bias is not None else [])).clone()
    data = torch.cat([_pack(codes, bits), index]).clone()
    header = [out, inp, codebook.numel(), int(bias is not None), bits, kind, index_bits, nnz, count]
    module = CodebookLinear(floats, data, header)
    if not torch.equal(module.weight, shared.view(out, inp)):
        raise EngineError("codebook encoding is not exact (decoded weights differ from the shared weights)")
    figures = {
        "bits": bits,
        "clusters": int(codebook.numel()),
        "sparsity": round(1 - nnz / (out * inp), 6),
        "index": "bitmask" if kind == 1 else f"relative_{index_bits}bit",
        "index_bytes": index_bytes,
        "bytes_dense": 4 * (out * inp + (out if bias is not None else 0)),
        "bytes_encoded": 4 * floats.numel() + data.numel(),
        "sqnr_db": _sqnr_db(weight, shared.view(out, inp)),
    }
    return module, shared.view(out, inp), figures


def run_stage(model: nn.Module, scheme: str, options: dict[str, Any], ctx: StageContext) -> StageResult:
    """Weight-share and sparse-encode the chosen Linear layers; returns a ScriptModule.

    Args:
        model: an eager module or an exported program's graph module (ctx.kind).
        scheme: "codebook".
        options: bits (2..8), layers, prune_classifier (default True: every layer, as Han et al.),
            min_sparsity (layers sparser than this are encoded; others stay float).
        ctx: example input (for tracing when scripting fails).
    Returns:
        StageResult(kind="torchscript") with a per-layer table in info["layers"]; an eager model is
        weight-shared in place instead and delivered in the deep_compression container
        (worker.compression.deep_compression) unless the job asks for output_format torchscript.
    Example:
        >>> run_stage(pruned, "codebook", {"bits": 5, "min_sparsity": 0.5}, ctx).info["layers"][0]["bytes_encoded"]
    """
    if scheme != "codebook":
        raise EngineError(f"unknown encode scheme {scheme!r}; known schemes: ['codebook']")
    options = with_defaults("encode", scheme, options)
    if ctx.kind == "torchscript":
        raise EngineError(
            "codebook encoding swaps layers for another module type, which a TorchScript model "
            "cannot take; upload a state_dict with an architecture or an exported program"
        )
    bits = int(options["bits"])
    if not 2 <= bits <= 8:
        raise EngineError(f"bits must be in [2, 8], got {bits}")
    min_sparsity = float(options["min_sparsity"])
    include_classifier = bool(options["prune_classifier"])
    if ctx.kind == "eager" and ctx.output_format != "torchscript":
        from worker.compression.deep_compression import run_weights_stage

        return run_weights_stage(model, options, ctx)
    if options.get("finetune_epochs"):
        raise EngineError(
            "finetune_epochs is available for the deep_compression container only "
            "(an eager model without output_format torchscript)"
        )
    if ctx.kind == "graph":
        from worker.compression.quantization import torch_level_module

        model = torch_level_module(model)
    model = model.cpu().eval()
    layers = select_layers(model, options.get("layers"), include_classifier=include_classifier)
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    total = nonzero = biases = 0
    signal = noise = 0.0
    for position, (name, module) in enumerate(layers):
        ctx.check_cancelled()
        ctx.progress(position / max(1, len(layers)), f"encoding {name}")
        weight = module._parameters.get("weight") if not isinstance(module, torch.jit.ScriptModule) else None
        if not isinstance(module, nn.Linear) or weight is None:
            skipped.append({"layer": name, "reason": f"{type(module).__name__} is not encoded (Linear only)"})
            continue
        sparsity = 1 - int(torch.count_nonzero(weight)) / weight.numel()
        if sparsity < min_sparsity:
            skipped.append({"layer": name, "reason": f"sparsity {sparsity:.3f} < min_sparsity {min_sparsity}"})
            continue
        encoded, shared, figures = encode_layer(weight, module.bias, bits)
        signal += float(weight.detach().double().pow(2).sum())
        noise += float((weight.detach().double() - shared.double()).pow(2).sum())
        biases += module.bias.numel() if module.bias is not None else 0
        nonzero += int(torch.count_nonzero(module.bias)) if module.bias is not None else 0
        total += weight.numel()
        nonzero += int(torch.count_nonzero(shared))
        _set_submodule(model, name, encoded)
        rows.append({"layer": name, **figures})
    if not rows:
        raise EngineError(
            "no layer was encoded: "
            + ("; ".join(f"{s['layer']}: {s['reason']}" for s in skipped) or "no Linear layer chosen")
        )
    _pool_storage([m for m in model.modules() if isinstance(m, CodebookLinear)])
    ctx.progress(0.9, "scripting")
    scripted = _script(model, ctx.example_input)
    info: dict[str, Any] = {
        "scheme": scheme,
        "bits": bits,
        "layers": rows,
        "skipped": skipped,
        "bytes_dense": sum(r["bytes_dense"] for r in rows),
        "bytes_encoded": sum(r["bytes_encoded"] for r in rows),
        "weight_sqnr_db": 10 * math.log10(signal / noise) if noise > 0 else float("inf"),
    }
    info["encoded_ratio"] = round(info["bytes_dense"] / max(1, info["bytes_encoded"]), 3)
    # Encoded weights are no parameters any more: report the float model's counts over the encoded layers too.
    params_left = sum(p.numel() for p in scripted.parameters())
    nonzero_left = sum(int(torch.count_nonzero(p)) for p in scripted.parameters())
    info["parameters"] = [params_left + total + biases, nonzero_left + nonzero]
    ctx.progress(1.0, "encoded")
    return StageResult(model=scripted, kind="torchscript", info=info, preferred_output_format="torchscript")


def _pool_storage(modules: list[CodebookLinear]) -> None:
    """Make every layer's tensors views of two shared storages: the archive then holds two
    tensor records instead of two per layer (each record costs ~100-200 bytes of zip
    headers and 64-byte alignment padding)."""
    floats = torch.cat([m.floats for m in modules])
    data = torch.cat([m.data for m in modules])
    f_at = d_at = 0
    for m in modules:
        nf, nd = m.floats.numel(), m.data.numel()
        m.floats, m.data = floats[f_at : f_at + nf], data[d_at : d_at + nd]
        f_at, d_at = f_at + nf, d_at + nd


def _script(model: nn.Module, example: Batch) -> torch.jit.ScriptModule:
    try:
        return torch.jit.script(model)
    except Exception as script_error:  # graph modules and dynamic Python: trace instead
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.jit.trace(model, example, check_trace=False)  # type: ignore[no-untyped-call, no-any-return]  # torch.jit.trace is unannotated
        except Exception as trace_error:
            raise EngineError(
                f"the encoded model could be neither scripted ({_last_line(script_error)}) "
                f"nor traced ({_last_line(trace_error)})"
            ) from trace_error


def _sqnr_db(reference: Tensor, approx: Tensor) -> float:
    noise = float((reference.double() - approx.double()).pow(2).sum())
    signal = float(reference.double().pow(2).sum())
    return round(10 * math.log10(signal / noise), 3) if noise > 0 else float("inf")


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _last_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else type(error).__name__
