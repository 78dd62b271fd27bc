"""Every artifact format, once: its name on the wire, file extension, media type and how a user loads it.

The API (request schema, download file name), the runner (storage keys), the dashboard (through the download's
file name) and the README's "Loading an artifact" section all follow this table; tests/test_artifact_formats.py
checks the README and the catalogue against it. No third-party imports: the client ships it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

# the names as a type for request schemas; the table below must hold exactly these (checked at import)
OutputFormat = Literal[
    "torchscript",
    "exported_program",
    "state_dict",
    "sparse_state_dict",
    "compact_state_dict",
    "deep_compression",
    "onnx",
    "executorch",
]
OCTET_STREAM = "application/octet-stream"


@dataclass(frozen=True)
class ArtifactFormat:
    name: str
    extension: str
    runtime: str  # where it runs: torch, onnxruntime or executorch
    # the line of the README's loading code that opens a file of this format (the README holds it verbatim)
    load: str
    media_type: str = OCTET_STREAM


ARTIFACT_FORMATS: dict[str, ArtifactFormat] = {
    f.name: f
    for f in (
        ArtifactFormat("torchscript", "pt", "torch", 'model = torch.jit.load("artifact.pt")'),
        ArtifactFormat("exported_program", "pt2", "torch", 'model = torch.export.load("artifact.pt2").module()'),
        ArtifactFormat(
            "state_dict", "pt", "torch", 'my_model.load_state_dict(torch.load("artifact.pt", weights_only=True))'
        ),
        ArtifactFormat("sparse_state_dict", "pt", "torch", 'state = torch.load("artifact.pt", weights_only=True)'),
        ArtifactFormat(
            "compact_state_dict",
            "pt",
            "torch",
            'my_model.load_state_dict(decode_sparse_state_dict(torch.load("artifact.pt", weights_only=True)))',
        ),
        ArtifactFormat(
            "deep_compression", "mpdc", "torch", 'my_model.load_state_dict(load_state_dict("artifact.mpdc"))'
        ),
        ArtifactFormat(
            "onnx",
            "onnx",
            "onnxruntime",
            'session = ort.InferenceSession("artifact.onnx", options, providers=["CPUExecutionProvider"])',
        ),
        ArtifactFormat(
            "executorch",
            "pte",
            "executorch",
            'method = Runtime.get().load_program("artifact.pte").load_method("forward")',
        ),
    )
}
if set(ARTIFACT_FORMATS) != set(get_args(OutputFormat)):
    raise RuntimeError("ARTIFACT_FORMATS and OutputFormat name different formats")

UNKNOWN_EXTENSION = "bin"


def extension_of(name: str) -> str:
    """The file extension of an artifact of format `name` ("bin" for a name this version does not know)."""
    known = ARTIFACT_FORMATS.get(name)
    return known.extension if known else UNKNOWN_EXTENSION


def media_type_of(name: str) -> str:
    known = ARTIFACT_FORMATS.get(name)
    return known.media_type if known else OCTET_STREAM
