"""Models and data the tests build themselves (nothing is downloaded)."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.fixtures import SmallCNN as SmallCNN

# the digits data and the training recipe live with the benchmarks, which share them without importing tests
from bench.fixtures import digits_split as digits_split
from bench.fixtures import sqnr_db as sqnr_db
from bench.fixtures import train as train

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class OneLayer(nn.Module):
    """A linear classifier: its only layer is the classifier, so structured pruning has nothing to remove."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def mlp(widths: tuple[int, ...] = (64, 300, 100, 10)) -> nn.Sequential:
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def accuracy(model: Callable[[torch.Tensor], torch.Tensor], inputs: np.ndarray, labels: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.tensor(inputs)).argmax(1) == torch.tensor(labels)).float().mean())


def torchscript_bytes(model: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(model.eval()), buffer)
    return buffer.getvalue()


class SlowForward(nn.Module):
    """A model whose forward takes seconds: long enough to cancel or kill a job while it runs."""

    def __init__(self, iterations: int = 50000) -> None:
        super().__init__()
        self.iterations = iterations
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.iterations):
            x = x * 1.0
        return self.fc(x)


def slow_torchscript_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(SlowForward()), buffer)
    return buffer.getvalue()


def exported_bytes(model: nn.Module, example: torch.Tensor) -> bytes:
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def npz_bytes(inputs: np.ndarray, labels: np.ndarray | None = None) -> bytes:
    buffer = io.BytesIO()
    arrays: dict[str, Any] = {"inputs": inputs}
    if labels is not None:
        arrays["labels"] = labels
    np.savez(buffer, **arrays)
    return buffer.getvalue()


class WorkerProcess:
    """A real Celery worker process, started with the given environment."""

    def __init__(self, env: dict[str, str], queues: str = "cpu", log_path: Path | None = None) -> None:
        self.env = dict(os.environ, **env, MODELPRESS_WORKER_QUEUES=queues)
        self.queues = queues
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.celery_app",
                "worker",
                "-Q",
                self.queues,
                "--concurrency",
                "1",
                "--pool",
                "prefork",
                "--loglevel",
                "INFO",
                "--without-mingle",
                "--without-gossip",
            ],
            cwd=PROJECT_ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, sig)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path and self.log_path.exists() else ""


def wait_for(predicate: Callable[[], Any], timeout: float, message: str, interval: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s: {message}")


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (e.g. a job's scratch folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_api_process(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A real uvicorn API process on a free loopback port; returns it and its base URL."""
    port = free_port()
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "app.main:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return server, f"http://127.0.0.1:{port}"
