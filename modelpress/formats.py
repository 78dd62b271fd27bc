"""Cheap, torch-free facts about uploaded files: magic bytes and zip structure.

The API uses these to reject garbage at once and to guess a format; the
worker's sandboxed child does the real loading.
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
from pathlib import Path
from typing import Any

ZIP_MAX_MEMBERS = 10_000
ZIP_MAX_RATIO = 200  # declared uncompressed size / compressed size
SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024
SAFETENSORS_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


class FormatError(ValueError):
    """The file is not a model or dataset we accept; the message says why."""


def check_zip(path: Path, max_total_bytes: int) -> list[str]:
    """Structural checks of a zip archive before anything parses it; returns member names."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError) as error:
        raise FormatError(f"not a valid zip archive: {error}") from error
    if len(infos) > ZIP_MAX_MEMBERS:
        raise FormatError(f"archive has {len(infos)} members (limit {ZIP_MAX_MEMBERS})")
    total = sum(info.file_size for info in infos)
    if total > max_total_bytes:
        raise FormatError(f"archive declares {total} uncompressed bytes (limit {max_total_bytes})")
    for info in infos:
        if (
            info.compress_type != zipfile.ZIP_STORED
            and info.compress_size
            and info.file_size / info.compress_size > ZIP_MAX_RATIO
        ):
            raise FormatError(f"member {info.filename!r} has a compression ratio above {ZIP_MAX_RATIO}")
        if info.filename.startswith("/") or ".." in Path(info.filename).parts:
            raise FormatError(f"member {info.filename!r} has an unsafe path")
    return [info.filename for info in infos]


def check_safetensors(path: Path) -> dict[str, Any]:
    """Header size and tensor offsets must lie inside the file; returns the header."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise FormatError("file too short for safetensors")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(SAFETENSORS_MAX_HEADER, size - 8):
            raise FormatError("safetensors header size points outside the file")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise FormatError(f"safetensors header is not JSON: {error}") from error
    if not isinstance(header, dict):
        raise FormatError("safetensors header is not an object")
    data_len = size - 8 - header_len
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise FormatError(f"safetensors tensor {name!r} has offsets outside the file")
        shape = entry.get("shape")
        itemsize = SAFETENSORS_ITEMSIZE.get(str(entry.get("dtype")))
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)) or itemsize is None:
            raise FormatError(f"safetensors tensor {name!r} has an unknown dtype or a bad shape")
        # a tensor must occupy exactly its bytes: no huge shapes backed by a few bytes
        if math.prod(shape) * itemsize != offsets[1] - offsets[0]:
            raise FormatError(
                f"safetensors tensor {name!r} declares shape {shape} but holds {offsets[1] - offsets[0]} bytes"
            )
    return header


# compressed tar archives (gzip, bzip2, xz); a plain tar says "ustar" at offset 257
TAR_COMPRESSION_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def _is_tar(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(262)
    return head.startswith(TAR_COMPRESSION_MAGIC) or head[257:262] == b"ustar"


def _is_model_folder_zip(names: list[str]) -> bool:
    """A zip of a save_pretrained folder: config.json at its root or in one folder."""
    return any(n == "config.json" or (n.count("/") == 1 and n.endswith("/config.json")) for n in names)


def sniff_model_format(path: Path, max_total_bytes: int) -> str:
    """Guess the format of an uploaded model from its structure, without unpickling.

    A tar of a model folder is only recognised by its magic bytes here: its members are
    checked (paths, links, sizes) where it is unpacked, in the worker's sandbox.
    """
    with open(path, "rb") as handle:
        magic = handle.read(8)
    if magic[:2] == b"PK":
        names = check_zip(path, max_total_bytes)
        if _is_model_folder_zip(names):
            return "huggingface"
        if any(
            n.endswith("serialized_exported_program.json")
            or "/models/" in n
            and n.endswith(".json")
            or n.endswith("archive_format")
            for n in names
        ):
            return "exported_program"
        if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            return "state_dict"
        raise FormatError("zip archive is neither TorchScript, torch.save nor torch.export output")
    if _is_tar(path):
        return "huggingface"
    if len(magic) == 8:
        check_safetensors(path)
        return "safetensors"
    raise FormatError(
        "file is not a PyTorch model (TorchScript, state_dict, safetensors, exported program, "
        "or a zip / tar of a Hugging Face save_pretrained folder)"
    )


def check_model_file(path: Path, declared_format: str, max_total_bytes: int) -> None:
    """Check that the structure matches the declared format."""
    if declared_format == "safetensors":
        check_safetensors(path)
        return
    sniffed = sniff_model_format(path, max_total_bytes)
    if sniffed != declared_format:
        raise FormatError(f"file looks like {sniffed}, not {declared_format}")


def _npz_headers(path: Path, names: list[str]) -> dict[str, tuple[list[int], str]]:
    """Shape and dtype of every array of an .npz, read from the .npy headers (no pickle, no data)."""
    import numpy as np

    found: dict[str, tuple[list[int], str]] = {}
    with zipfile.ZipFile(path) as archive:
        for name in names:
            with archive.open(name) as member:
                try:
                    version = np.lib.format.read_magic(member)
                    reader = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = reader(member)
                except ValueError as error:
                    raise FormatError(f"array {name} is not a valid .npy: {error}") from error
            if dtype.hasobject:
                raise FormatError(f"array {name} holds Python objects (pickles are not accepted)")
            found[name[:-4]] = ([int(d) for d in shape], dtype.str)
    return found


def _label_range(path: Path, kind: str) -> list[int] | None:
    import numpy as np

    if kind == "npz":
        with np.load(path, allow_pickle=False) as archive:
            labels = archive["labels"]
    else:
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as handle:
            labels = handle.get_tensor("labels")
    if labels.size == 0:
        return None
    if not np.issubdtype(labels.dtype, np.integer):
        raise FormatError("dataset 'labels' must be integer class ids")
    return [int(labels.min()), int(labels.max())]


SAFETENSORS_TO_NUMPY = {
    "F16": "<f2",
    "BF16": "bf16",
    "F32": "<f4",
    "F64": "<f8",
    "I8": "|i1",
    "U8": "|u1",
    "I16": "<i2",
    "I32": "<i4",
    "I64": "<i8",
    "BOOL": "|b1",
}


def sniff_dataset(path: Path, max_total_bytes: int) -> dict[str, Any]:
    """Check an .npz (no pickled members) or .safetensors dataset; returns its arrays' shapes,
    dtypes, sample count and label range, all without unpickling anything."""
    with open(path, "rb") as handle:
        magic = handle.read(8)
    if magic[:2] == b"PK":
        names = [n for n in check_zip(path, max_total_bytes) if n.endswith(".npy")]
        headers = _npz_headers(path, names)
        kind = "npz"
    else:
        header = check_safetensors(path)
        headers = {
            k: (v["shape"], SAFETENSORS_TO_NUMPY.get(v["dtype"], v["dtype"]))
            for k, v in header.items()
            if k != "__metadata__"
        }
        kind = "safetensors"
    # one `inputs` array, or several named like the model's declared inputs (plus labels / targets)
    input_names = ["inputs"] if "inputs" in headers else sorted(k for k in headers if k not in ("labels", "targets"))
    if not input_names:
        raise FormatError("dataset needs an array named 'inputs' (or arrays named like the model's inputs)")
    shapes = {k: v[0] for k, v in headers.items()}
    for name in input_names:
        if not shapes[name]:
            raise FormatError(f"'{name}' needs a first axis of samples")
    samples = shapes[input_names[0]][0]
    for name in input_names + ["labels", "targets"]:
        if name in shapes and (not shapes[name] or shapes[name][0] != samples):
            raise FormatError(f"dataset has {samples} samples but '{name}' has shape {shapes[name]}")
    info = {
        "format": kind,
        "arrays": sorted(headers),
        "shapes": shapes,
        "dtypes": {k: v[1] for k, v in headers.items()},
        "samples": samples,
    }
    if "labels" in headers:
        info["label_range"] = _label_range(path, kind)
    return info
