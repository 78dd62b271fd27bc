"""Benchmark: ln_structured on transformers (attention heads and MLP channels), zoo BERT / ViT / GPT-2 and a
6-layer BERT-base-sized encoder. Per model and setting: parameters, .pt2 file and weight bytes of the pruned
artifact against the original exported the same way, interleaved median latency (one thread), SQNR of the
scored output on held-out inputs, and for the zoo models the SQNR after a 150-step distillation towards
the original (what a following distill stage would do).

    python -m bench.transformer_pruning
"""

from __future__ import annotations

import copy
import tempfile
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.fixtures import sqnr_db
from bench.model_zoo import VOCAB, build
from worker.compression.base import StageContext
from worker.compression.inputs import Batch, ModelInputs, Signature, call_model, select_output
from worker.compression.io import save_artifact
from worker.compression.pruning import run_stage

SETTINGS = ((0.5, 0.0), (0.0, 0.5), (0.5, 0.5))  # (heads, amount)
DISTILL_STEPS = 150


def _tokens(names: list[str], batch: int, sequence: int, generator: torch.Generator) -> ModelInputs:
    ids = torch.randint(0, VOCAB, (batch, sequence), generator=generator)
    return ModelInputs([ids, torch.ones_like(ids)][: len(names)], names)


def _median_ms(model: Any, inputs: Batch, runs: int = 20) -> float:
    times = []
    with torch.no_grad():
        for _ in range(runs):
            start = time.perf_counter()
            call_model(model, inputs)
            times.append(time.perf_counter() - start)
    return sorted(times)[runs // 2] * 1e3


def _count(model: nn.Module) -> int:
    return sum(t.numel() for t in {id(t): t for t in model.state_dict().values()}.values())


def _weight_bytes(path: Path) -> int:
    with zipfile.ZipFile(path) as archive:
        return sum(item.file_size for item in archive.infolist() if "/weights/" in item.filename)


def _distill(student: nn.Module, teacher: nn.Module, draw: Any) -> None:
    optimizer = torch.optim.Adam([t for t in student.parameters() if t.is_floating_point()], lr=1e-3)
    for _ in range(DISTILL_STEPS):
        batch = draw()
        with torch.no_grad():
            target = select_output(call_model(teacher, batch))
        loss = nn.functional.mse_loss(select_output(call_model(student, batch)), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def measure(
    name: str, model: nn.Module, example: Batch, signature: Signature | None, draw: Any, distill: bool, runs: int = 20
) -> None:
    generator = torch.Generator().manual_seed(7)
    with tempfile.TemporaryDirectory() as folder:
        original_path = Path(folder) / "original.pt2"
        save_artifact(model, "eager", "exported_program", original_path, example, signature)
        original = torch.export.load(str(original_path)).module()
        test = draw(generator)
        for heads, amount in SETTINGS:
            options = {"amount": amount, "heads": heads, "layers": None, "prune_classifier": False}
            options |= {"schedule": None, "train": None, "norm": 2.0}
            context = StageContext(kind="eager", example_input=example, signature=signature)
            result = run_stage(copy.deepcopy(model), "ln_structured", options, context)
            path = Path(folder) / "pruned.pt2"
            save_artifact(result.model, result.kind, "exported_program", path, example, signature)
            pruned = torch.export.load(str(path)).module()
            before, after = [], []
            for _ in range(7):  # interleaved, so load on the machine hits both alike
                before.append(_median_ms(original, test, runs))
                after.append(_median_ms(pruned, test, runs))
            slow, fast = sorted(before)[3], sorted(after)[3]
            with torch.no_grad():
                reference = select_output(call_model(original, test))
                sqnr = sqnr_db(reference, select_output(call_model(pruned, test)))
            line = (
                f"{name:9s} heads {heads:.1f} mlp {amount:.1f}: params {_count(pruned) / _count(original):.3f}x, "
                f"file {path.stat().st_size / original_path.stat().st_size:.3f}x, "
                f"weights {_weight_bytes(path) / _weight_bytes(original_path):.3f}x, "
                f"latency {slow:.2f} -> {fast:.2f} ms ({slow / fast:.2f}x), SQNR {sqnr:.1f} dB"
            )
            if distill:
                _distill(result.model, model, lambda: draw(generator))
                with torch.no_grad():
                    tuned = sqnr_db(reference, select_output(call_model(result.model, test)))
                line += f", after {DISTILL_STEPS}-step distill {tuned:.1f} dB"
            print(line, flush=True)


def main() -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    token = {"name": "input_ids", "shape": [2, 12], "dtype": "int64", "low": 0, "high": VOCAB, "dynamic": [0, 1]}
    mask = dict(token, name="attention_mask", low=1, high=2)
    for name in ("bert", "gpt2"):
        entry = build(name)
        specs = [token, mask] if name == "bert" else [token]
        names = [str(spec["name"]) for spec in specs]
        signature = Signature.from_request(specs, None)
        example = ModelInputs(list(entry.inputs), names)
        measure(name, entry.model, example, signature, lambda g, n=names: _tokens(n, 16, 12, g), distill=True)
    vit = build("vit")
    measure("vit", vit.model, vit.inputs[0], None, lambda g: torch.randn(16, 3, 32, 32, generator=g), distill=True)

    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=768, num_hidden_layers=6, num_attention_heads=12, intermediate_size=3072, torchscript=True
    )
    base = BertModel(config).eval()
    specs = [dict(token, shape=[2, 64], high=config.vocab_size), dict(mask, shape=[2, 64])]
    names = ["input_ids", "attention_mask"]
    example = ModelInputs([torch.randint(0, config.vocab_size, (2, 64)), torch.ones(2, 64, dtype=torch.long)], names)

    def draw(generator: torch.Generator) -> ModelInputs:
        ids = torch.randint(0, config.vocab_size, (8, 64), generator=generator)
        return ModelInputs([ids, torch.ones_like(ids)], names)

    measure("bert-6L-768", base, example, Signature.from_request(specs, None), draw, distill=False, runs=3)


if __name__ == "__main__":
    main()
