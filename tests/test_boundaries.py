"""Imports run one way: the API never imports the worker or torch, the engine nothing of the service, the client
the engine only inside the `--local` path; and no module grows past 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import PROJECT_ROOT

SERVICE_PACKAGES = ("app", "celery", "kombu", "sqlalchemy", "fastapi", "alembic", "redis", "httpx", "boto3")


def _imports(path: Path, *, module_level_only: bool) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found: list[tuple[int, str]] = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def _python_files(folder: str) -> list[Path]:
    return sorted((PROJECT_ROOT / folder).rglob("*.py"))


def _top(name: str) -> str:
    return name.split(".")[0]


def test_the_api_imports_neither_the_worker_nor_torch() -> None:
    offenders = [
        f"{path.relative_to(PROJECT_ROOT)}:{line} imports {name}"
        for path in _python_files("app")
        for line, name in _imports(path, module_level_only=False)
        if _top(name) in ("worker", "torch")
    ]
    assert offenders == []


def test_the_engine_imports_nothing_of_the_service() -> None:
    offenders = [
        f"{path.relative_to(PROJECT_ROOT)}:{line} imports {name}"
        for path in _python_files("worker/compression")
        for line, name in _imports(path, module_level_only=False)
        if _top(name) in SERVICE_PACKAGES or name.startswith("worker.") and not name.startswith("worker.compression")
    ]
    assert offenders == []


def test_the_client_imports_the_engine_only_when_running_locally() -> None:
    offenders = [
        f"{path.relative_to(PROJECT_ROOT)}:{line} imports {name}"
        for path in _python_files("modelpress")
        for line, name in _imports(path, module_level_only=True)
        if _top(name) in ("worker", "torch", "app")
    ]
    assert offenders == []


@pytest.mark.parametrize("folder", ["app", "worker", "modelpress"])
def test_no_module_is_over_500_lines(folder: str) -> None:
    long = {
        str(path.relative_to(PROJECT_ROOT)): count
        for path in _python_files(folder)
        if (count := len(path.read_text().splitlines())) > 500
    }
    assert long == {}


def _string_constants(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [(n.lineno, n.value) for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_job_statuses_are_spelled_only_by_the_enum() -> None:
    """Status changes go through app/job_states.py and comparisons name JobStatus members: a plain "queued" or
    "failed" in the service, the worker or the client would bypass the state machine unseen."""
    from modelpress.job_status import JobStatus

    spelled = {status.value for status in JobStatus}
    files = _python_files("app") + _python_files("modelpress") + _python_files("worker")
    offenders = [
        f"{path.relative_to(PROJECT_ROOT)}:{line} {value!r}"
        for path in files
        if path.name != "job_status.py" and "compression" not in path.relative_to(PROJECT_ROOT).parts
        for line, value in _string_constants(path)
        if value in spelled
    ]
    assert offenders == []


def test_bench_stands_on_its_own_fixtures() -> None:
    offenders = [
        f"{path.relative_to(PROJECT_ROOT)}:{line} imports {name}"
        for path in _python_files("bench")
        for line, name in _imports(path, module_level_only=False)
        if _top(name) == "tests"
    ]
    assert offenders == []


QUERY_BUILDERS = {"select", "update", "insert", "delete", "func"}
# besides app/routes/: services, the reconciler and the runner ask app/repositories/ (status changes go through
# app/job_states.py)
QUERYLESS_MODULES = ("app/jobs.py", "app/resources.py", "app/reconciler.py", "worker/runner.py")


def test_routers_services_and_the_runner_leave_queries_to_the_repositories() -> None:
    files = [*_python_files("app/routes"), *(PROJECT_ROOT / name for name in QUERYLESS_MODULES)]
    offenders = [
        f"{path.relative_to(PROJECT_ROOT)}:{node.lineno} imports {alias.name} from {node.module}"
        for path in files
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sqlalchemy")
        for alias in node.names
        if alias.name in QUERY_BUILDERS
    ]
    assert offenders == []
