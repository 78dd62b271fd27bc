"""Client-side CLI commands (models, datasets, jobs, compress)."""
from __future__ import annotations

import argparse


def add_client_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    return None
