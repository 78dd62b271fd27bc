"""Inspection: what the API learns about an upload, from the sandboxed child."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers import SmallCNN, exported_bytes, mlp, torchscript_bytes
from worker.compression.inspect import inspect_model


def test_exported_program_signature_and_output_shape(tmp_path: Path) -> None:
    model = SmallCNN().eval()
    path = tmp_path / "cnn.pt2"
    path.write_bytes(exported_bytes(model, torch.randn(8, 64)))
    report = inspect_model(path, "exported_program", None)
    assert report["kind"] == "graph" and report["output_shape"] == [2, 10]
    [entry] = report["input_signature"]
    assert entry["shape"][1] == "64" and not entry["shape"][0].isdigit()  # the batch stays dynamic
    assert report["parameters"] == sum(p.numel() for p in model.parameters())


def test_torchscript_parameters_and_layers(tmp_path: Path) -> None:
    model = mlp((16, 8, 4))
    path = tmp_path / "m.pt"
    path.write_bytes(torchscript_bytes(model))
    report = inspect_model(path, "torchscript", None)
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    assert report["layer_types"]["Linear"] == 2 and report["output_shape"] is None


def test_an_exported_lstm_graph_is_flagged(tmp_path: Path) -> None:
    # Quantizing an exported LSTM graph used to crash natively (a trace sized aten.lstm's zero state
    # for one batch); the engine now lifts it to nn.LSTM (tests/engine/test_recurrent_and_constants.py),
    # so submit no longer refuses it. Inspection still flags the graph for crash reports.
    from tests import zoo

    path = zoo.build("lstm").save_exported(tmp_path / "lstm.pt2")
    report = inspect_model(path, "exported_program", None)
    assert report["recurrent_graph"] is True
    cnn = tmp_path / "cnn.pt2"
    cnn.write_bytes(exported_bytes(SmallCNN().eval(), torch.randn(8, 64)))
    assert inspect_model(cnn, "exported_program", None)["recurrent_graph"] is False
