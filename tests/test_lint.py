"""The code stays lint-clean (pyflakes errors, syntax errors, bugbear) under the project's ruff settings."""

from __future__ import annotations

import shutil
import subprocess
import sys

from tests.helpers import PROJECT_ROOT


def test_ruff_finds_nothing() -> None:
    ruff = shutil.which("ruff", path=str(PROJECT_ROOT / ".venv" / "bin")) or shutil.which("ruff")
    command = [ruff] if ruff else [sys.executable, "-m", "ruff"]
    result = subprocess.run(
        [*command, "check", "--output-format", "concise", "app", "worker", "modelpress", "tests", "bench"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
