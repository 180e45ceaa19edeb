"""Files written whole or not at all: a reader (another process, a later run, S3 on disk) never sees half of one."""
from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; it becomes ``path`` when the block ends, and is removed
    when the block raises. Hidden and named for the process and thread, so that concurrent writers of
    the same path (parallel jobs, a folder being listed) never meet half a file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        yield temporary
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


def write_atomically(path: Path, data: bytes | str) -> None:
    """``data`` (text as UTF-8) as the whole content of ``path``."""
    with replacing(path) as temporary:
        temporary.write_bytes(data.encode() if isinstance(data, str) else data)


def write_json(path: Path, document: Any, default: Any = None) -> None:
    """``document`` as pretty-printed JSON with sorted keys, in a folder made if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(document, indent=2, sort_keys=True, default=default) + "\n")
