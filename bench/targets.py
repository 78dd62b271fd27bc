"""Deployment targets side by side: one BERT-like encoder as torch fp32, torch int8, ORT fp32/int8,
ExecuTorch fp32/int8 (`python -m bench.run --only targets`).

Every row is a job run by the engine (`worker.compression.pipeline.run_job`) at one thread and
batch 1, so the figures are the ones a job reports: artifact size, p50 latency measured in the
runtime that serves it, SQNR of its hidden states against the float PyTorch model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

WIDTH, HEADS, LAYERS, TOKENS = 256, 4, 2, 32


class BertEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 4 * WIDTH, dropout=0.0, batch_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.encoder(x))


VARIANTS: tuple[tuple[str, str, list[dict[str, Any]]], ...] = (
    ("torch int8 (dynamic_int8)", "torch", [{"method": "quantize", "scheme": "dynamic_int8", "options": {}}]),
    ("ORT fp32", "onnxruntime", []),
    ("ORT int8 (dynamic_int8)", "onnxruntime", [{"method": "quantize", "scheme": "dynamic_int8", "options": {}}]),
    (
        "ORT int8 (static_int8 QDQ)",
        "onnxruntime",
        [{"method": "quantize", "scheme": "static_int8", "options": {"calibration_batches": 4}}],
    ),
    ("ExecuTorch fp32 (XNNPACK)", "executorch", []),
    (
        "ExecuTorch int8 (XNNPACK dynamic)",
        "executorch",
        [{"method": "quantize", "scheme": "dynamic_int8", "options": {}}],
    ),
)


def run(size: Any, assets: Any) -> dict[str, Any]:
    from worker.compression.pipeline import JobRequest, run_job

    torch.manual_seed(0)
    model = BertEncoder().eval()
    rows: list[list[Any]] = []
    figures: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        model_path = folder / "bert.pt2"
        batch = torch.export.Dim("batch", min=1, max=512)
        torch.export.save(
            torch.export.export(model, (torch.randn(2, TOKENS, WIDTH),), dynamic_shapes=({0: batch},)), str(model_path)
        )
        data = folder / "data.npz"
        np.savez(data, inputs=torch.randn(128, TOKENS, WIDTH, generator=torch.Generator().manual_seed(1)).numpy())
        for label, runtime, stages in VARIANTS:
            if runtime == "executorch" and not _has_executorch():
                rows.append([label, None, None, None, "executorch not installed"])
                continue
            suffix = {"torch": "pt", "onnxruntime": "onnx", "executorch": "pte"}[runtime]
            try:
                result = run_job(
                    JobRequest.from_dict(
                        {
                            "model": {"path": str(model_path), "format": "exported_program"},
                            "stages": stages,
                            "artifact_path": str(folder / f"{len(figures)}.{suffix}"),
                            "example_input_shape": [1, TOKENS, WIDTH],
                            "dataset_path": str(data),
                            "eval_dataset_path": str(data),
                            "runtime": runtime,
                            "threads": 1,
                        }
                    )
                )
            except Exception as error:  # a scheme that fails on this model is a row, not a crash
                rows.append([label, None, None, None, f"job failed: {str(error).splitlines()[0][:160]}"])
                if runtime == "torch":
                    rows.append(_torch_int8_eager(model, data))
                continue
            metrics = result["metrics"]
            if not figures:  # the float PyTorch original, as every job measures it
                torch_fp32 = metrics["original"] if runtime == "torch" else metrics["original_in_torch"]
                figures["torch fp32"] = {
                    "size_bytes": torch_fp32["size_bytes"],
                    "latency_ms_p50": torch_fp32["latency_ms_p50"],
                    "sqnr_db": None,
                }
                rows.append(
                    ["torch fp32 (.pt2)", torch_fp32["size_bytes"], torch_fp32["latency_ms_p50"], None, "reference"]
                )
            compressed = metrics["compressed"]
            figures[label] = {
                "size_bytes": compressed["size_bytes"],
                "latency_ms_p50": compressed["latency_ms_p50"],
                "sqnr_db": metrics["fidelity"]["sqnr_db"],
            }
            rows.append(
                [
                    label,
                    compressed["size_bytes"],
                    compressed["latency_ms_p50"],
                    metrics["fidelity"]["sqnr_db"],
                    "; ".join(metrics["warnings"]) or "",
                ]
            )
    base = figures["torch fp32"]["latency_ms_p50"]
    ort_int8 = figures["ORT int8 (dynamic_int8)"]["latency_ms_p50"]
    speedup = base / ort_int8 if ort_int8 else None
    return {
        "title": "Deployment targets",
        "intro": (
            f"A {LAYERS}-layer BERT-like encoder (width {WIDTH}, {TOKENS} tokens), batch 1, one thread: each "
            "row is an engine job whose artifact was loaded back and measured in its own runtime."
        ),
        "command": ".venv/bin/python -m bench.run --only targets",
        "tables": [
            {
                "title": "Size, p50 latency and SQNR per runtime",
                "columns": ["artifact", "size (bytes)", "p50 (ms)", "SQNR (dB)", "warnings"],
                "rows": rows,
            }
        ],
        "targets": [
            {
                "target": "ORT int8 of the BERT >= 2x faster than torch fp32 at batch 1",
                "measured": f"{speedup:.2f}x" if speedup else "n/a",
                "met": bool(speedup and speedup >= 2.0),
            }
        ],
        "figures": figures,
    }


def _torch_int8_eager(model: nn.Module, data: Path) -> list[Any]:
    """torch.ao quantize_dynamic on the eager module (no job): the torch int8 figure when the job path fails."""
    import io

    from worker.compression import metrics as measure

    # the encoder's fast path reads Linear.weight.device, which packed int8 Linear layers do not have
    torch.backends.mha.set_fastpath_enabled(False)
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    with np.load(data) as archive:
        inputs = torch.from_numpy(archive["inputs"])
    buffer = io.BytesIO()
    torch.save(quantized.state_dict(), buffer)
    latency = measure.measure_latency(quantized, inputs[:1], threads=1)["latency_ms_p50"]
    sqnr = measure.fidelity(measure.predict(model, inputs), measure.predict(quantized, inputs))["sqnr_db"]
    return [
        "torch int8 (quantize_dynamic on the eager module, outside a job)",
        len(buffer.getvalue()),
        latency,
        sqnr,
        "state_dict size",
    ]


def _has_executorch() -> bool:
    import importlib.util

    return importlib.util.find_spec("executorch") is not None
