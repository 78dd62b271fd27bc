"""`pip install modelpress` is the client and the CLI: they run with the service's and the engine's packages
absent, and the service's commands say which extra to install. Checked in a child process where importing torch,
fastapi, sqlalchemy or celery fails, as it does where only the client's dependencies are installed."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

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


def _client_dependency_folder(folder: Path) -> Path:
    """A folder holding only what `pip install modelpress` installs: the [project] dependencies of
    pyproject.toml and theirs, linked from this environment (offline: nothing is downloaded)."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    declared = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pending, seen = [Requirement(r) for r in declared], set()
    while pending:
        requirement = pending.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = requirement.name.lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue  # an optional backport this Python does not need
        pending += [Requirement(r) for r in dist.requires or []]
        for file in dist.files or []:
            top = file.parts[0]
            if top.endswith((".dist-info", ".egg-info")) or top in ("..", "__pycache__") or top.endswith(".pth"):
                continue
            link = folder / top
            if not link.exists():
                link.symlink_to(Path(str(dist.locate_file(top))))
    return folder


def test_the_client_runs_on_its_declared_dependencies_alone(tmp_path: Path) -> None:
    folder = _client_dependency_folder(tmp_path)
    code = (
        f"import sys; sys.path[:0] = [{str(PROJECT_ROOT)!r}, {str(folder)!r}]\n"
        "import modelpress.client, modelpress.artifact_formats, modelpress.deep_compression_format\n"
        "from modelpress.cli import main\n"
        "assert main(['jobs', 'list', '--help']) == 0\n"
    )
    # -S: no site-packages, so nothing outside the linked folder is importable
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=120)
    assert "usage: modelpress jobs list" in result.stdout, result.stderr
    server = subprocess.run(
        [sys.executable, "-S", "-c", code.replace("['jobs', 'list', '--help']) == 0", "['migrate']) == 2")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert server.returncode == 0, server.stderr
    assert "pip install 'modelpress[server]'" in server.stderr
