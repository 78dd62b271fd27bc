"""The search falls back to mixed precision when plain int8 misses the bar."""

from __future__ import annotations

import io

import torch
from torch import nn

from tests.engine.transformer_models import tiny_bert, token_ids
from worker.compression import metrics as measure
from worker.compression.base import Dataset, StageContext
from worker.compression.quantization import run_stage as quantize
from worker.compression.search import run_stage as search


def test_search_keeps_the_harmful_layers_float_when_plain_int8_misses(one_thread: None) -> None:
    model = tiny_bert(hidden=64, layers=4, heads=4, vocab=300, max_length=32)
    ids = token_ids(24, length=16, vocab=300)
    ctx = StageContext(kind="eager", example_input=ids[:4], train_data=Dataset(ids))
    reference = measure.predict(model, ids)
    plain = quantize(model, "dynamic_int8", {"skip_layers": []}, ctx).model
    plain_sqnr = measure.fidelity(reference, measure.predict(plain, ids))["sqnr_db"]
    bar = plain_sqnr + 3
    recipes = [[{"method": "quantize", "scheme": "dynamic_int8"}]]
    result = search(model, "accuracy_aware", {"min_sqnr_db": bar, "candidates": {"recipes": recipes}}, ctx)
    trials = result.info["trials"]
    assert [t["candidate"] for t in trials] == ["recipe 0", "recipe 0 mixed precision"]
    assert trials[0]["status"] == "missed" and trials[0]["sqnr_db"] < bar
    assert trials[1]["status"] == "met" and trials[1]["stages"] == [{**recipes[0][0], "min_sqnr_db": bar}]
    assert result.info["result"] == "met" and result.info["chosen"]["candidate"] == "recipe 0 mixed precision"
    # the delivered model, traced and reloaded as the artifact is, measured here
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.trace(result.model, ids[:4], check_trace=False), buffer)
    delivered = torch.jit.load(io.BytesIO(buffer.getvalue()))
    measured = measure.fidelity(reference, measure.predict(delivered, ids))["sqnr_db"]
    assert measured >= bar and abs(measured - trials[1]["sqnr_db"]) < 0.01
    float_linears = [m for m in result.model.modules() if type(m) is nn.Linear]
    int8_linears = [m for m in result.model.modules() if type(m).__module__.startswith("torch.ao.nn.quantized")]
    assert float_linears and int8_linears  # some layers kept in float, the rest int8
