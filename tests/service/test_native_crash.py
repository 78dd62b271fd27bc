"""A native crash inside the sandbox is explained: the stage, the operation, the signal, frames, a hint.

The crashing model is a real registered architecture, added the way teams add theirs (an installed
package's `modelpress.architectures` entry point). Its package is installed into the job's scratch
folder, the child's working directory and so the first entry of its import path, because nothing
may be installed into the shared environment for a test. Its forward kills its own process with
SIGSEGV when it runs in training mode with gradients on, which happens only while a pruning stage
fine-tunes it: loading, the pre-flight call and the fidelity measurement run it in eval mode.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from worker.sandbox import Limits, run_sandboxed

LIMITS = Limits(memory_bytes=4 * 1024**3, cpu_seconds=120, file_bytes=1024**3, open_files=128, wall_seconds=120)

CRASHER = """
import os
import signal

import torch
from torch import nn


class Crasher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with open("forward-calls-in-training.txt", "a") as marker:
            if self.training and torch.is_grad_enabled():
                marker.write("crash\\n")
                marker.close()
                os.kill(os.getpid(), signal.SIGSEGV)
        return self.fc2(torch.relu(self.fc1(x)))
"""


def _install_crasher(scratch: Path) -> None:
    (scratch / "modelpress_crasher.py").write_text(CRASHER)
    info = scratch / "modelpress_crasher-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: modelpress-crasher\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[modelpress.architectures]\ncrasher = modelpress_crasher:Crasher\n")


@pytest.mark.parametrize("isolation", ["bubblewrap"])
def test_a_segfault_during_a_stage_names_the_stage_the_operation_and_the_signal(tmp_path: Path, isolation: str) -> None:
    scratch = tmp_path / "job-crash-1"
    scratch.mkdir()
    _install_crasher(scratch)
    weights = {
        "fc1.weight": torch.randn(16, 8),
        "fc1.bias": torch.zeros(16),
        "fc2.weight": torch.randn(4, 16),
        "fc2.bias": torch.zeros(4),
    }
    torch.save(weights, scratch / "model.pt")
    import numpy as np

    np.savez(scratch / "data.npz", inputs=np.random.randn(64, 8).astype("float32"), labels=np.arange(64) % 4)
    request = {
        "model": {"path": str(scratch / "model.pt"), "format": "state_dict", "architecture": {"name": "crasher"}},
        "stages": [
            {"method": "prune", "scheme": "l1_unstructured", "options": {"amount": 0.5, "train": {"epochs": 1}}}
        ],
        "artifact_path": str(scratch / "out.pt"),
        "dataset_path": str(scratch / "data.npz"),
    }
    outcome = run_sandboxed("job", request, scratch, LIMITS, isolation=isolation)

    assert not outcome.ok and outcome.error is not None
    error = outcome.error
    assert error["error"] == "NativeCrash"
    assert error["signal"] == "SIGSEGV"
    assert error["stage"] == "prune:l1_unstructured"
    assert "fine-tun" in error["operation"]
    assert error["retryable"] is False
    assert "SIGSEGV" in error["detail"] and "prune:l1_unstructured" in error["detail"]
    assert error["hint"]
    # faulthandler's dump names the frame that sent the signal: the model's forward
    assert (
        error["frames"] and error["frames"][0].startswith("modelpress_crasher.py:") and "forward" in error["frames"][0]
    )
    # it crashed once, in the one run: the child ran the training forward exactly one time
    assert (scratch / "forward-calls-in-training.txt").read_text() == "crash\n"


def test_breadcrumbs_are_one_page_rewritten_in_place_and_a_long_text_is_trimmed_not_lost(tmp_path: Path) -> None:
    """The record is rewritten with one page-sized write (no rename per breadcrumb), so it never grows and each
    read gives the last breadcrumb whole; a text too long for the page keeps where the job was."""
    from worker.compression import breadcrumbs

    try:
        breadcrumbs.leave_in(tmp_path)
        path = tmp_path / breadcrumbs.FILE_NAME
        inode = path.stat().st_ino
        breadcrumbs.stage("prune:l1_unstructured")
        breadcrumbs.operation("epoch 1/2: loss 0.5")
        breadcrumbs.operation("export: torch.export")
        assert breadcrumbs.read(tmp_path) == {
            "stage": "prune:l1_unstructured",
            "operation": "export: torch.export",
            "model": {},
        }
        assert path.stat().st_ino == inode and path.stat().st_size == breadcrumbs.RECORD_BYTES
        assert [p.name for p in tmp_path.iterdir()] == [breadcrumbs.FILE_NAME]
        breadcrumbs.operation("é" * 5000)  # 30,000 bytes as JSON escapes
        crumb = breadcrumbs.read(tmp_path)
        assert crumb is not None and crumb["stage"] == "prune:l1_unstructured"
        assert crumb["operation"] == "é" * breadcrumbs.TRIMMED_CHARS
        assert path.stat().st_size == breadcrumbs.RECORD_BYTES
    finally:
        breadcrumbs.leave_in(tmp_path / "missing")  # no such folder: later breadcrumbs in this process are no-ops
