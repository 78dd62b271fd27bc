"""Benchmark: analyze/sensitivity on a 6-layer BERT-base-sized encoder (hidden 768, 12 heads, FFN 3072, 37 Linears
with the pooler), eager and TorchScript, 16 sequences of 64 tokens, one thread. Prints wall seconds per kind.

    python -m bench.sensitivity
"""

from __future__ import annotations

import time
import warnings

import torch


def main() -> None:
    warnings.simplefilter("ignore")
    from worker.compression.torchvision_ops import declare_torchvision_ops

    declare_torchvision_ops()  # transformers imports torchvision when it is installed
    from transformers import BertConfig, BertModel

    from worker.compression.base import Dataset, StageContext
    from worker.compression.sensitivity import run_stage

    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=768,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=3072,
        return_dict=False,
    )
    bert = BertModel(config).eval()

    class LastHidden(torch.nn.Module):  # one tensor in, one tensor out, as the engine's probes take
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.bert(ids)[0]

    model = LastHidden().eval()
    ids = torch.randint(0, 30522, (16, 64))
    for kind, subject in (("eager", model), ("torchscript", torch.jit.trace(model, ids[:2], strict=False))):
        ctx = StageContext(kind=kind, example_input=ids[:4], train_data=Dataset(ids))  # type: ignore[arg-type]
        started = time.perf_counter()
        info = run_stage(subject, "sensitivity", {"samples": 16}, ctx).info
        print(
            f"{kind}: {len(info['sensitivity'])} layers in {time.perf_counter() - started:.1f} s; "
            f"worst {info['sensitivity'][0]}"
        )


if __name__ == "__main__":
    main()
