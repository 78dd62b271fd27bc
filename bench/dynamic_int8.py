"""dynamic int8 for runtime torch, side by side: torch.ao (today's default) against its replacements
(`python -m bench.run --only dynamic_int8`).

`torch.ao.quantization` is deprecated. The engine keeps its `quantize_dynamic` path while it can be
imported and is the faster one (worker/compression/quantization/dynamic_torchao.py); this section is
the measurement behind that choice. For an MLP and a small BERT-like encoder, at batch 1 and 64, one
thread: p50 latency, SQNR against the float model, and whether the artifact loads with torch alone.

Rows: float; torch.ao `quantize_dynamic` (fbgemm kernels; TorchScript artifact); torchao
`Int8DynamicActivationInt8WeightConfig` eager and exported to .pt2 (what the engine's fallback
delivers; loading needs `import torchao`); torchao `Int8WeightOnlyConfig` exported (weight-only, for
reference); PT2E with the XNNPACK dynamic quantizer (`convert_pt2e`, run as a graph module).
"""

from __future__ import annotations

import copy
import io
import math
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

BATCHES = (1, 64)


class Encoder(nn.Module):
    """Two post-norm transformer layers (the BERT shape without the embeddings)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def _models(tiny: bool) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    width = 64 if tiny else 256
    hidden = 256 if tiny else 1024
    mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.ReLU(), nn.Linear(4 * hidden, hidden)).eval()
    return [
        (f"MLP {hidden}->{4 * hidden}->{hidden}", mlp, (hidden,)),
        (f"BERT-like encoder (2 layers, width {width}, 32 tokens)", Encoder(width).eval(), (32, width)),
    ]


def _p50_ms(model: Callable[[torch.Tensor], Any], x: torch.Tensor, calls: int) -> float:
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        timings = []
        for _ in range(calls):
            started = time.perf_counter()
            model(x)
            timings.append((time.perf_counter() - started) * 1e3)
    return round(statistics.median(timings), 3)


def _sqnr(reference: torch.Tensor, output: torch.Tensor) -> float:
    noise = (reference - output).pow(2).mean().item()
    return round(10 * math.log10(reference.pow(2).mean().item() / noise), 1) if noise else math.inf


def _exported(model: nn.Module, feature_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    """torch.export with a dynamic batch, saved and loaded back: (loaded module, file bytes)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (torch.randn(2, *feature_shape),), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    size = len(buffer.getvalue())
    buffer.seek(0)
    return torch.export.load(buffer).module(), size


def _torch_ao(model: nn.Module, feature_shape: tuple[int, ...]) -> tuple[Any, int | None, str]:
    from torch.ao.quantization import quantize_dynamic

    torch.backends.mha.set_fastpath_enabled(False)  # the encoder fast path reads packed Linear weights
    quantized = quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    traced = torch.jit.trace(quantized, torch.randn(2, *feature_shape), check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    size = len(buffer.getvalue())
    buffer.seek(0)
    return torch.jit.load(buffer), size, "TorchScript (deprecated), torch alone"


def _torchao(config_name: str, export: bool) -> Callable[[nn.Module, tuple[int, ...]], tuple[Any, int | None, str]]:
    def build(model: nn.Module, feature_shape: tuple[int, ...]) -> tuple[Any, int | None, str]:
        import torchao.quantization as tq

        quantized = copy.deepcopy(model)
        tq.quantize_(quantized, getattr(tq, config_name)())
        if not export:
            return quantized, None, "eager module (state_dict of torchao tensors)"
        loaded, size = _exported(quantized, feature_shape)
        return loaded, size, ".pt2, needs import torchao"

    return build


def _pt2e_xnnpack(model: nn.Module, feature_shape: tuple[int, ...]) -> tuple[Any, int | None, str]:
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer()
    quantizer.set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True))
    batch = torch.export.Dim("batch", min=1, max=4096)
    example = torch.randn(2, *feature_shape)
    graph = torch.export.export(copy.deepcopy(model), (example,), dynamic_shapes=({0: batch},)).module()
    prepared = prepare_pt2e(graph, quantizer)
    prepared(example)
    return convert_pt2e(prepared), None, "graph module (q/dq ops need torchao to load)"


VARIANTS: tuple[tuple[str, Callable[[nn.Module, tuple[int, ...]], tuple[Any, int | None, str]]], ...] = (
    ("torch.ao quantize_dynamic (engine default)", _torch_ao),
    ("torchao Int8DynamicActivationInt8WeightConfig, eager", _torchao("Int8DynamicActivationInt8WeightConfig", False)),
    (
        "torchao Int8DynamicActivationInt8WeightConfig, exported .pt2 (engine fallback)",
        _torchao("Int8DynamicActivationInt8WeightConfig", True),
    ),
    ("torchao Int8WeightOnlyConfig, exported .pt2 (weight-only)", _torchao("Int8WeightOnlyConfig", True)),
    ("PT2E XNNPACKQuantizer dynamic, convert_pt2e", _pt2e_xnnpack),
)


def run(size: Any, assets: Any) -> dict[str, Any]:
    tiny = size.name == "tiny"
    calls = 5 if tiny else 30
    rows: list[list[Any]] = []
    figures: dict[str, dict[str, Any]] = {}
    torch_ao_ms: dict[int, float] = {}
    ratios: list[float] = []  # the engine's fallback latency / torch.ao's, per model and batch
    for model_name, model, feature_shape in _models(tiny):
        inputs = {
            batch: torch.randn(batch, *feature_shape, generator=torch.Generator().manual_seed(batch))
            for batch in BATCHES
        }
        with torch.no_grad():
            reference = {batch: model(x) for batch, x in inputs.items()}
        float_ms = {batch: _p50_ms(model, x, calls) for batch, x in inputs.items()}
        rows.append([model_name, "float32", float_ms[1], float_ms[64], None, None, "eager"])
        for label, build in VARIANTS:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    quantized, size_bytes, loads = build(model, feature_shape)
                    latency = {batch: _p50_ms(quantized, x, calls) for batch, x in inputs.items()}
                    with torch.no_grad():
                        sqnr = _sqnr(reference[64], quantized(inputs[64]))
            except Exception as error:  # a path this torch cannot run is a finding, not a crash
                rows.append([model_name, label, None, None, None, None, f"failed: {str(error).splitlines()[0][:120]}"])
                continue
            rows.append([model_name, label, latency[1], latency[64], sqnr, size_bytes, loads])
            figures[f"{model_name} / {label}"] = {"p50_ms": latency, "float_p50_ms": float_ms, "sqnr_db": sqnr}
            if label == VARIANTS[0][0]:
                torch_ao_ms = latency
            elif "engine fallback" in label:
                ratios += [latency[batch] / max(torch_ao_ms[batch], 1e-9) for batch in BATCHES]
    within = bool(ratios) and max(ratios) <= 1.10
    return {
        "title": "6. Dynamic int8 off torch.ao: torch.ao against torchao and PT2E",
        "intro": (
            "`torch.ao.quantization` is deprecated. The engine runs dynamic_int8 with torch.ao while it can be "
            "imported and is the faster, and otherwise with torchao's Int8DynamicActivationInt8WeightConfig "
            "exported to a .pt2 (which needs `import torchao` to load). One thread, p50 of the module the "
            "row names; SQNR at batch 64 against the float model. None of the torchao / PT2E rows has int8 "
            "CPU kernels without torch.compile, so on this CPU they are slower than torch.ao and than float."
        ),
        "command": ".venv/bin/python -m bench.run --only dynamic_int8",
        "tables": [
            {
                "title": "p50 latency (ms) at batch 1 and 64, SQNR, artifact",
                "columns": ["model", "path", "p50 b1 (ms)", "p50 b64 (ms)", "SQNR (dB)", "file (bytes)", "artifact"],
                "rows": rows,
            }
        ],
        "targets": [
            {
                "target": "the torchao fallback within 10% of torch.ao's speed (batch 1 and 64, both models)",
                "measured": f"{min(ratios):.1f}-{max(ratios):.1f}x torch.ao's latency" if ratios else "n/a",
                "met": within,
            }
        ],
        "figures": figures,
    }
