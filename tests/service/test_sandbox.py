"""Hostile files never run; a killed child ends with a readable reason and the parent lives on."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from worker.sandbox import Limits, run_sandboxed

LIMITS = Limits(memory_bytes=4 * 1024**3, cpu_seconds=120, file_bytes=1024**3, open_files=128, wall_seconds=120)


class Exploit:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {os.environ['EXPLOIT_MARKER']}",))


def test_pickle_payload_in_a_state_dict_never_runs(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EXPLOIT_MARKER", str(marker))
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2, 2), "payload": Exploit()}, path)
    outcome = run_sandboxed(
        "inspect",
        {"path": str(path), "format": "state_dict", "architecture": {"name": "mlp", "kwargs": {"widths": [2, 2]}}},
        tmp_path,
        LIMITS,
    )
    assert not outcome.ok and outcome.error is not None
    assert "allowlist" in outcome.error["detail"] or "weights_only" in outcome.error["detail"]
    assert not marker.exists()


def test_child_environment_holds_no_secrets(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from worker.sandbox import _clean_environment

    monkeypatch.setenv("MODELPRESS_DATABASE_URL", "postgresql://secret")
    env = _clean_environment(tmp_path, 1)
    assert not any(k.startswith(("MODELPRESS_", "AWS_")) for k in env)
    assert env["HOME"] == str(tmp_path)


def test_memory_hungry_model_is_killed_with_a_reason(tmp_path: Path) -> None:
    # A TorchScript model whose forward allocates far beyond the address-space limit.
    class Hog(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ones(1024, 1024, 1024, 4) + x.sum()

    path = tmp_path / "hog.pt"
    torch.jit.save(torch.jit.script(Hog()), str(path))
    limits = Limits(memory_bytes=3 * 1024**3, cpu_seconds=60, file_bytes=1024**3, open_files=128, wall_seconds=120)
    request = {
        "model": {"path": str(path), "format": "torchscript"},
        "stages": [{"method": "quantize", "scheme": "dynamic_int8", "options": {}}],
        "artifact_path": str(tmp_path / "out.pt"),
        "example_input_shape": [1, 4],
    }
    outcome = run_sandboxed("job", request, tmp_path, limits)
    assert not outcome.ok and outcome.error is not None
    assert "memory" in outcome.error["detail"].lower() or "alloc" in outcome.error["detail"].lower()


def test_wall_clock_timeout_kills_the_child(tmp_path: Path) -> None:
    class Sleeper(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for _ in range(1000000000):
                x = x + 1
            return x

    path = tmp_path / "slow.pt"
    torch.jit.save(torch.jit.script(Sleeper()), str(path))
    limits = Limits(memory_bytes=4 * 1024**3, cpu_seconds=60, file_bytes=1024**3, open_files=128, wall_seconds=8)
    request = {
        "model": {"path": str(path), "format": "torchscript"},
        "stages": [{"method": "quantize", "scheme": "dynamic_int8", "options": {}}],
        "artifact_path": str(tmp_path / "out.pt"),
        "example_input_shape": [1, 4],
    }
    outcome = run_sandboxed("job", request, tmp_path, limits)
    assert not outcome.ok and outcome.error == {
        "error": "TimeLimitExceeded",
        "detail": "the job ran past its 8 s limit",
    }


def test_zip_bomb_and_bad_safetensors_are_refused_by_structure(tmp_path: Path) -> None:
    import struct
    import zipfile

    import pytest

    from modelpress.formats import FormatError, check_safetensors, check_zip

    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a/data.pkl", b"\0" * 50_000_000)
    with pytest.raises(FormatError, match="compression ratio"):
        check_zip(bomb, 10**12)
    with pytest.raises(FormatError, match="uncompressed"):
        check_zip(bomb, 1000)
    bad = tmp_path / "bad.safetensors"
    header = b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 4000]}}'
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(FormatError, match="offsets"):
        check_safetensors(bad)
    huge = tmp_path / "huge.safetensors"
    header = b'{"w": {"dtype": "F32", "shape": [1099511627776], "data_offsets": [0, 16]}}'
    huge.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(FormatError, match="declares shape"):
        check_safetensors(huge)
    lying = tmp_path / "lying.safetensors"
    lying.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(FormatError, match="header size"):
        check_safetensors(lying)


class IndirectImport:
    """Reaches os.system through importlib instead of naming it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        import importlib

        return (importlib.import_module("os").system, (f"touch {self.marker}",))


def _hostile_files(tmp_path: Path, marker: Path) -> dict[str, tuple[Path, str]]:
    import pickle
    import zipfile

    files: dict[str, tuple[Path, str]] = {}
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(IndirectImport(str(marker))))
    files["raw pickle"] = (raw, "state_dict")
    hidden = tmp_path / "hidden.pt"
    torch.save({"weight": torch.zeros(2, 2), "x": IndirectImport(str(marker))}, hidden)
    files["pickle inside a state_dict archive"] = (hidden, "state_dict")
    # a TorchScript archive whose data.pkl was swapped for a payload
    scripted = tmp_path / "good.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(scripted))
    evil_ts = tmp_path / "evil_ts.pt"
    with zipfile.ZipFile(scripted) as source, zipfile.ZipFile(evil_ts, "w") as target:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename.endswith("/data.pkl"):
                data = pickle.dumps(IndirectImport(str(marker)), protocol=2)
            target.writestr(item, data)
    files["TorchScript with a swapped pickle"] = (evil_ts, "torchscript")
    return files


def test_malicious_corpus_never_runs_and_each_file_is_rejected_with_a_reason(tmp_path: Path) -> None:
    marker = tmp_path / "canary"
    for label, (path, fmt) in _hostile_files(tmp_path, marker).items():
        outcome = run_sandboxed(
            "inspect",
            {"path": str(path), "format": fmt, "architecture": {"name": "mlp", "kwargs": {"widths": [2, 2]}}},
            tmp_path,
            LIMITS,
        )
        assert not outcome.ok, label
        assert outcome.error is not None and outcome.error["detail"], label
        assert not marker.exists(), f"{label} ran code"
