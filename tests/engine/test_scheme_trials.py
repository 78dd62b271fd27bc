"""Upload trials: each main scheme tried on the upload, and what failed refused at submit with its sentence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from modelpress.catalog import JobFacts, SpecError, trial_refusals, validate_stages
from tests.helpers import OneLayer, SmallCNN, exported_bytes
from worker.compression.inspect import inspect_model
from worker.compression.scheme_trials import TrialRequest, run_trials
from worker.compression.trial_plan import ALL_TRIALS, read_progress, trial_inputs


class NeedsRate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, sr: int) -> torch.Tensor:
        return self.fc(x) * (1.0 if sr == 16000 else -1.0)


def _upload(tmp_path: Path, model: nn.Module, example: torch.Tensor) -> tuple[Path, dict[str, object]]:
    torch.manual_seed(0)
    path = tmp_path / "model.pt2"
    path.write_bytes(exported_bytes(model.eval(), example))
    return path, inspect_model(path, "exported_program", None)


def test_each_scheme_is_tried_and_a_failure_keeps_its_sentence(tmp_path: Path) -> None:
    path, inspection = _upload(tmp_path, OneLayer(), torch.randn(4, 16))
    inputs = trial_inputs(None, inspection)
    # an exported program's float placeholder gives the inputs; its batch dimension stays dynamic
    assert inputs == [{"name": "x", "shape": [1, 16], "dtype": "float32", "dynamic": [0]}]

    results = run_trials(TrialRequest(str(path), "exported_program", None, inputs), tmp_path)

    assert set(results) == set(ALL_TRIALS)
    assert results["prune:ln_structured"]["ok"] is False
    assert "match no prunable layer" in results["prune:ln_structured"]["reason"]
    assert results["quantize:dynamic_int8"]["ok"] is True and results["quantize:dynamic_int8"]["sqnr_db"] > 25
    assert results["quantize:static_int8"]["ok"] is True and results["quantize:fp16"]["ok"] is True
    # its one layer is the classifier, which pruning leaves alone unless told: nothing for either to do
    assert "prune_classifier" in results["prune:l1_unstructured"]["reason"]
    # what the supervisor reads back from the scratch folder: all done, none in progress
    written, trying, skipped = read_progress(tmp_path)
    assert written == results and trying is None and skipped is None


def test_a_failed_trial_refuses_the_scheme_as_a_first_stage_only(tmp_path: Path) -> None:
    inspection = {
        "scheme_trials": {
            "results": {
                "prune:ln_structured": {"ok": False, "reason": "ln_structured found nothing to remove in this model"},
                "quantize:dynamic_int8": {"ok": True, "size_ratio": 3.1},
            }
        }
    }
    refusals = trial_refusals(inspection)
    assert refusals == {"prune:ln_structured": "ln_structured found nothing to remove in this model"}
    facts = JobFacts("exported_program", trial_refusals=refusals)
    with pytest.raises(SpecError, match="tried on this model when it was uploaded and failed: ln_structured found"):
        validate_stages([{"method": "prune", "scheme": "ln_structured", "amount": 0.3}], facts)
    assert validate_stages([{"method": "quantize", "scheme": "dynamic_int8"}], facts)
    # another amount is the scheme as tried; an option the trial did not use may change the outcome
    with pytest.raises(SpecError, match="when it was uploaded"):
        validate_stages([{"method": "prune", "scheme": "ln_structured", "amount": 0.7}], facts)
    assert validate_stages([{"method": "prune", "scheme": "ln_structured", "prune_classifier": True}], facts)
    # after another stage the model is not the upload any more: the trial says nothing about it
    later = [
        {"method": "prune", "scheme": "l1_unstructured", "amount": 0.5},
        {"method": "prune", "scheme": "ln_structured"},
    ]
    assert len(validate_stages(later, facts)) == 2
    # nor about what another runtime's tools do
    assert trial_refusals({"scheme_trials": {"skipped": "its inputs are not known"}}) == {}


def test_a_model_that_does_not_run_on_its_declared_inputs_alone_is_not_refused_anything(tmp_path: Path) -> None:
    # the constant `sr` comes with each job (forward_kwargs), not with the upload: every trial would fail
    # for that one reason, which says nothing about the schemes
    path = tmp_path / "rate.pt"
    torch.jit.save(torch.jit.script(NeedsRate().eval()), str(path))
    inputs = [{"name": "x", "shape": [1, 16], "dtype": "float32", "dynamic": [0]}]

    assert run_trials(TrialRequest(str(path), "torchscript", None, inputs), tmp_path) == {}
    _, _, skipped = read_progress(tmp_path)
    assert skipped is not None and "sr" in skipped


def test_integer_inputs_need_a_declared_range(tmp_path: Path) -> None:
    cnn = tmp_path / "cnn.pt2"
    cnn.write_bytes(exported_bytes(SmallCNN().eval(), torch.randn(8, 64)))
    assert trial_inputs(None, inspect_model(cnn, "exported_program", None)) is not None
    graph = {"kind": "graph", "input_signature": [{"name": "ids", "shape": ["s0", "12"], "dtype": "torch.int64"}]}
    assert trial_inputs(None, graph) is None
    declared = [{"name": "ids", "shape": [1, 12], "dtype": "int64", "low": 0, "high": 100}]
    assert trial_inputs(declared, graph) == declared
