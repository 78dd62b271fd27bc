"""One version number: the package metadata, the API document and the CHANGELOG's latest release agree."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import modelpress

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def test_package_metadata_carries_the_one_version() -> None:
    assert version("modelpress") == modelpress.__version__


def test_the_api_document_carries_the_one_version() -> None:
    from app.main import create_app

    assert create_app().openapi()["info"]["version"] == modelpress.__version__


def test_the_changelog_latest_release_is_the_one_version() -> None:
    releases = re.findall(r"^## (\d+\.\d+\.\d+)", (PROJECT_ROOT / "CHANGELOG.md").read_text(), flags=re.M)
    assert releases, "CHANGELOG.md names no release"
    assert releases[0] == modelpress.__version__
