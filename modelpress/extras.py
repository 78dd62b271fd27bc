"""Which optional part of ModelPress a command needs, and the install line that brings it.

`pip install modelpress` is the client; the service's commands (serve, migrate, keys, cleanup), the worker and
`compress --local` need an extra. Without it they say which, instead of failing deep inside with an ImportError.
"""

from __future__ import annotations

import importlib.util
import sys

# what each extra brings that its commands import first
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "server": ("fastapi", "uvicorn", "sqlalchemy", "alembic", "pydantic_settings"),
    "worker": ("celery", "sqlalchemy", "pydantic_settings", "torch"),
    "local": ("torch",),
}


def install_hint(extra: str) -> str:
    return f"pip install 'modelpress[{extra}]'"


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a finder that refuses it, or a half-imported module
        return False


def missing_modules(extra: str) -> list[str]:
    return [module for module in EXTRA_MODULES[extra] if not _importable(module)]


def require_extra(extra: str, what: str) -> bool:
    """True when `extra` is installed; otherwise prints what is missing and the install line, and returns False."""
    missing = missing_modules(extra)
    if missing:
        print(
            f"{what} needs the '{extra}' extra ({', '.join(missing)} not installed): {install_hint(extra)}",
            file=sys.stderr,
        )
    return not missing
