"""`pip install modelpress` is the client and the CLI: they run with the service's and the engine's packages
absent, and the service's commands say which extra to install. Checked in a child process where importing torch,
fastapi, sqlalchemy or celery fails, as it does where only the client's dependencies are installed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import PROJECT_ROOT

ABSENT = ("torch", "fastapi", "sqlalchemy", "celery", "uvicorn", "alembic")
# a meta-path finder ahead of the real ones: these packages are "not installed" in the child
BLOCKER = f"""
import sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Absent())
"""


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120
    )


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return _run(f"from modelpress.cli import main; sys.exit(main({list(argv)!r}))")


def test_the_blocker_blocks() -> None:
    result = _run("import torch")
    assert result.returncode != 0 and "No module named 'torch'" in result.stderr


def test_the_client_module_imports_without_the_service_or_the_engine() -> None:
    result = _run(
        "import modelpress.client as c; c.Client('http://127.0.0.1:1', api_key='k');"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {ABSENT!r} + ('app', 'worker')))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [("--help",), ("jobs", "--help"), ("jobs", "list", "--help"), ("compress", "--help")])
def test_the_cli_helps_without_the_service_or_the_engine(argv: tuple[str, ...]) -> None:
    result = _cli(*argv)
    assert result.returncode == 0, result.stderr
    assert "usage: modelpress" in result.stdout


@pytest.mark.parametrize(
    ("argv", "extra"),
    [
        (("serve",), "server"),
        (("migrate",), "server"),
        (("keys", "list"), "server"),
        (("cleanup",), "server"),
        (("worker",), "worker"),
    ],
)
def test_a_service_command_names_the_extra_to_install(argv: tuple[str, ...], extra: str) -> None:
    result = _cli(*argv)
    assert result.returncode == 2
    assert f"pip install 'modelpress[{extra}]'" in result.stderr
    assert "Traceback" not in result.stderr
