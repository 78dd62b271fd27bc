"""One table of artifact formats (modelpress/artifact_formats.py): the catalogue, the request schema and the
README's loading code agree with it."""

from __future__ import annotations

import re
from typing import get_args

import pytest

from modelpress.artifact_formats import ARTIFACT_FORMATS, OutputFormat, extension_of
from modelpress.catalog import OUTPUT_FORMATS
from tests.helpers import PROJECT_ROOT


def _loading_section() -> str:
    readme = (PROJECT_ROOT / "README.md").read_text()
    start = readme.index("## Loading an artifact")
    return readme[start : readme.index("\n## ", start + 1)]


def test_the_catalogue_and_the_request_schema_offer_exactly_the_table() -> None:
    from app.schemas import JobCreate

    assert set(OUTPUT_FORMATS) == set(ARTIFACT_FORMATS) == set(get_args(OutputFormat))
    schema = JobCreate.model_json_schema()
    offered = schema["properties"]["output_format"]["anyOf"][0]["enum"]
    assert set(offered) == set(ARTIFACT_FORMATS)


@pytest.mark.parametrize("name", sorted(ARTIFACT_FORMATS))
def test_the_readme_loads_each_format_as_the_table_says(name: str) -> None:
    section = _loading_section()
    entry = ARTIFACT_FORMATS[name]
    # its own commented paragraph, and the table's loading line verbatim in the code the tests run
    assert f'# output_format "{name}"' in section
    assert entry.load in section
    # the file the snippet opens carries the table's extension
    opened = re.findall(r'"artifact\.(\w+)"', entry.load)
    assert opened == [entry.extension]


def test_the_readme_describes_no_format_outside_the_table() -> None:
    described = set(re.findall(r'# output_format "(\w+)"', _loading_section()))
    assert described == set(ARTIFACT_FORMATS)


def test_an_unknown_format_gets_a_neutral_extension() -> None:
    assert extension_of("a_format_from_a_newer_worker") == "bin"
    assert extension_of("onnx") == "onnx" and extension_of("exported_program") == "pt2"
