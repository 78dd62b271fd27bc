"""Unpacking an uploaded archive of a model folder (zip or tar), safely, inside the sandbox.

A `save_pretrained` folder arrives as one zip or tar (optionally gzip / bzip2 / xz
compressed). Every member is checked before anything is written: no absolute paths, no
`..`, no links or device files, at most MAX_MEMBERS members and MAX_UNPACKED_BYTES bytes
(counted as they are written, not as the archive declares them). Only the files a model
is built from are written; tokenizers and READMEs stay in the archive.
"""

from __future__ import annotations

import re
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO

from worker.compression.base import EngineError

MAX_MEMBERS = 1000
MAX_UNPACKED_BYTES = 16 * 1024**3
# what transformers reads to build and fill a model; the rest of a folder is not needed
MODEL_FILE = re.compile(
    r"^(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
    r"|pytorch_model(-\d+-of-\d+)?\.bin|pytorch_model\.bin\.index\.json)$"
)


def _checked_name(name: str) -> PurePosixPath | None:
    """The member's relative path, or an EngineError naming why it may not be unpacked."""
    if not name or "\x00" in name or "\\" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise EngineError(f"archive member {name!r} has an absolute or unsafe path")
    path = PurePosixPath(name)
    if ".." in path.parts:
        raise EngineError(f"archive member {name!r} points outside the folder (..)")
    return path


@contextmanager
def _open_members(archive: Path) -> Iterator[Iterator[tuple[PurePosixPath, bool, IO[bytes] | None]]]:
    """(path, is_directory, reader) for every member, refusing links and special files."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as opened:

            def zip_members() -> Iterator[tuple[PurePosixPath, bool, IO[bytes] | None]]:
                for info in opened.infolist():
                    path = _checked_name(info.filename)
                    mode = info.external_attr >> 16
                    if stat.S_ISLNK(mode):
                        raise EngineError(f"archive member {info.filename!r} is a symbolic link")
                    if info.is_dir():
                        yield path, True, None  # type: ignore[misc]
                    else:
                        with opened.open(info) as reader:
                            yield path, False, reader  # type: ignore[misc]

            yield zip_members()
        return
    try:
        opened_tar = tarfile.open(archive, mode="r:*")
    except (tarfile.TarError, OSError) as error:
        raise EngineError(f"model folder upload is neither a zip nor a tar archive: {error}") from error
    with opened_tar:

        def tar_members() -> Iterator[tuple[PurePosixPath, bool, IO[bytes] | None]]:
            for member in opened_tar:
                path = _checked_name(member.name)
                if member.isdir():
                    yield path, True, None  # type: ignore[misc]
                elif member.isfile():
                    yield path, False, opened_tar.extractfile(member)  # type: ignore[misc]
                else:
                    kind = "link" if member.issym() or member.islnk() else "special file"
                    raise EngineError(f"archive member {member.name!r} is a {kind}; only files and folders")

        try:
            yield tar_members()
        except tarfile.TarError as error:
            raise EngineError(f"tar archive is damaged: {error}") from error


def unpack_model_folder(archive: Path, destination: Path) -> Path:
    """Unpack the model files of `archive` under `destination`; returns the folder holding config.json.

    The folder may be the archive's root or one folder inside it (a zip of the folder itself).
    """
    destination.mkdir(parents=True, exist_ok=True)
    written, members = 0, 0
    folders: set[PurePosixPath] = set()
    with _open_members(archive) as entries:
        for path, is_directory, reader in entries:
            members += 1
            if members > MAX_MEMBERS:
                raise EngineError(f"archive has more than {MAX_MEMBERS} members")
            if is_directory or reader is None or not MODEL_FILE.match(path.name) or len(path.parts) > 2:
                continue
            if path.name == "config.json":
                folders.add(path.parent)
            target = destination.joinpath(*path.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as handle:
                while chunk := reader.read(1 << 20):
                    written += len(chunk)
                    if written > MAX_UNPACKED_BYTES:
                        raise EngineError(f"archive unpacks to more than {MAX_UNPACKED_BYTES} bytes")
                    handle.write(chunk)
    if not folders:
        raise EngineError("archive holds no config.json (a save_pretrained folder, or a zip / tar of one)")
    if len(folders) > 1:
        raise EngineError(f"archive holds several model folders: {sorted(str(f) for f in folders)}")
    return destination.joinpath(*next(iter(folders)).parts)


def remove_unpacked(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
