"""S3 on the local disk: ``s3://bucket/key`` is the file or folder ``<root>/<bucket>/<key>``.

Jobs read their inputs from here and write their outputs here, as SageMaker
downloads from and uploads to S3. Files are hard-linked where the disk allows
(nothing in a job writes to its inputs) and copied otherwise.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Callable

from pipeline.files import replacing, write_atomically
from pipeline.local.errors import LocalRunError

_URI = re.compile(r"^s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(.*))?$")


class LocalS3:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, uri: str) -> Path:
        """The local path of an S3 URI; refuses anything that is not ``s3://bucket[/key]``."""
        match = _URI.match(uri) if isinstance(uri, str) else None
        if not match:
            raise LocalRunError(f"{uri!r} is not an S3 URI (s3://bucket/key)")
        key = (match.group(2) or "").strip("/")
        if any(part in ("..", ".") for part in key.split("/")):
            raise LocalRunError(f"{uri!r} has '.' or '..' in its key")
        return self.root / match.group(1) / key if key else self.root / match.group(1)

    def uri(self, path: Path) -> str:
        """The S3 URI of a path under the root."""
        relative = Path(path).resolve().relative_to(self.root.resolve())
        return "s3://" + relative.as_posix()

    def download(self, uri: str, destination: Path) -> int:
        """Copy what is at ``uri`` into the folder ``destination`` (S3Prefix semantics); returns the files copied.

        An object lands as ``destination/<its file name>``; a prefix's objects keep
        their paths below the prefix.
        """
        source = self.path(uri)
        destination.mkdir(parents=True, exist_ok=True)
        if source.is_file():
            link_or_copy(source, destination / source.name)
            return 1
        if source.is_dir():
            count = copy_files(source, destination, link_or_copy)
            if count:
                return count
        raise LocalRunError(f"no S3 objects found under {uri} (local folder {source})")

    def upload(self, source: Path, uri: str) -> int:
        """Copy the files under the folder ``source`` to the prefix ``uri``; returns the files copied."""
        return copy_files(Path(source), self.path(uri), copy_atomically)

    def put(self, uri: str, data: bytes) -> Path:
        target = self.path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(target, data)
        return target


def copy_files(source: Path, destination: Path, copy: Callable[[Path, Path], None]) -> int:
    """Every file under the folder ``source`` to the same place under ``destination``, by ``copy``; returns the count."""
    count = 0
    for file in sorted(source.rglob("*")):
        if file.is_file():
            target = destination / file.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            copy(file, target)
            count += 1
    return count


def link_or_copy(source: Path, target: Path) -> None:
    if target.exists():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def copy_atomically(source: Path, target: Path) -> None:
    with replacing(target) as temporary:
        shutil.copy2(source, temporary)
