"""The engine's handler table: every stage config has a handler and every handler a config; one entry point."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelpress.configs import STAGE_CONFIGS, AccuracyAwareConfig, HintonConfig, L1UnstructuredConfig
from worker.compression.base import EngineError, StageContext
from worker.compression.distillation import DistillConfig
from worker.compression.handlers import HANDLERS, compress
from worker.compression.pipeline import JobRequest, StageSpec
from worker.compression.search import SearchConfig


def test_every_config_has_a_handler() -> None:
    assert [config.tag() for config in STAGE_CONFIGS if config not in HANDLERS] == []


def test_every_handler_has_a_config() -> None:
    assert [config.__name__ for config in HANDLERS if config not in STAGE_CONFIGS] == []


def test_compress_runs_the_typed_config() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    result = compress(model, L1UnstructuredConfig(amount=0.75), StageContext("eager", torch.randn(2, 16)))
    first = result.model[0].weight
    # measured on the weights themselves: 75% of the first layer is zero, the classifier is left alone
    assert int((first == 0).sum()) == round(0.75 * first.numel())
    assert int((result.model[2].weight == 0).sum()) == 0


def test_a_config_without_a_handler_is_an_engine_error() -> None:
    class Unregistered(L1UnstructuredConfig):
        pass

    with pytest.raises(EngineError, match="no engine handler for prune/l1_unstructured"):
        compress(nn.Linear(2, 2), Unregistered(), StageContext("eager", torch.zeros(1, 2)))


def test_the_job_request_carries_typed_configs() -> None:
    request = JobRequest.from_dict(
        {
            "model": {"path": "m.pt", "format": "torchscript"},
            "stages": [{"method": "prune", "scheme": "l1_unstructured", "options": {"amount": 0.8}}],
            "artifact_path": "a",
        }
    )
    assert request.stages == [L1UnstructuredConfig(amount=0.8)]
    with pytest.raises(EngineError, match=r"stages\[0\]: unknown option 'colour'"):
        JobRequest.from_dict(
            {
                "model": {"path": "m.pt", "format": "torchscript"},
                "stages": [StageSpec("prune", "l1_unstructured", {"colour": "red"}).__dict__],
                "artifact_path": "a",
            }
        )


def test_the_engines_defaults_are_the_configs() -> None:
    distill, hinton = DistillConfig.from_options({}), HintonConfig()
    assert (distill.temperature, distill.alpha, distill.width_multiplier, distill.sweep_time_budget_s) == (
        hinton.temperature,
        hinton.alpha,
        hinton.width_multiplier,
        hinton.sweep_time_budget_s,
    )
    search, accuracy_aware = SearchConfig.from_options({"min_sqnr_db": 20.0}), AccuracyAwareConfig()
    assert (search.objective, search.max_trials, search.time_budget_s) == (
        accuracy_aware.objective,
        accuracy_aware.max_trials,
        accuracy_aware.time_budget_s,
    )
