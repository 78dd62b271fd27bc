"""Registered architectures: built-ins, and teams' own classes through the entry-point group."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from modelpress.architectures import architecture_names
from worker.compression.base import EngineError
from worker.compression.registry import build_architecture


def test_builtins_build_and_run() -> None:
    mlp = build_architecture("mlp", {"widths": [64, 32, 10]})
    assert mlp(torch.zeros(2, 64)).shape == (2, 10)
    lenet = build_architecture("lenet5", {})
    assert lenet(torch.zeros(2, 64)).shape == (2, 10)


def test_unknown_names_and_bad_kwargs_are_engine_errors() -> None:
    with pytest.raises(EngineError, match="unknown architecture"):
        build_architecture("os.system", {})
    with pytest.raises(EngineError, match="rejected its kwargs"):
        build_architecture("mlp", {"widths": [4, 2], "evil": True})


def test_a_team_registers_its_own_class_through_an_entry_point(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # an installed distribution, as pip would lay it out: a module and its entry_points.txt
    (tmp_path / "team_models.py").write_text(
        "import torch\n"
        "class Tiny(torch.nn.Module):\n"
        "    def __init__(self, features: int = 4):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(features, 2)\n"
        "    def forward(self, x):\n"
        "        return self.fc(x)\n"
    )
    info = tmp_path / "team_models-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: team-models\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[modelpress.architectures]\ntiny = team_models:Tiny\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "tiny" in architecture_names()
    model = build_architecture("tiny", {"features": 3})
    assert model(torch.zeros(1, 3)).shape == (1, 2)
    sys.modules.pop("team_models", None)
