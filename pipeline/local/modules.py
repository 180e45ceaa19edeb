"""Import a script as its own runtime would: its sibling modules come from its folder, not from this process.

The inference container and each Lambda function import their scripts with
only their own folder on the path. Here they share one process, so modules
named like the folder's files (``common``, ``contract``, ``inference``) are set
aside while a script imports, so that it binds its own copies, and put back
after. ``sys.path``, ``sys.modules`` and ``os.environ`` are process-wide: one
import at a time.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Iterator, Mapping

_IMPORT_LOCK = threading.Lock()


@contextmanager
def script_folder(folder: Path, environment: Mapping[str, str] | None = None,
                  kept: tuple[str, ...] = ()) -> Iterator[None]:
    """While inside: ``folder`` first on the path, its modules its own, ``environment`` set; all put back after.

    A runtime that imports the script by name (the inference toolkit's ``Transformer``
    imports ``SAGEMAKER_PROGRAM``) does so inside. ``kept`` names variables the runtime
    itself changes (the toolkit prepends to PYTHONPATH): they are put back too.
    """
    siblings = {p.stem for p in folder.glob("*.py")}
    names = set(environment or {}) | set(kept)
    with _IMPORT_LOCK:
        saved_modules = {name: sys.modules.pop(name) for name in siblings if name in sys.modules}
        saved_path = list(sys.path)
        saved_environment = {name: os.environ.get(name) for name in names}
        sys.path.insert(0, str(folder))
        os.environ.update(environment or {})
        try:
            yield
        finally:
            for name in siblings:
                sys.modules.pop(name, None)
            sys.modules.update(saved_modules)
            sys.path[:] = saved_path
            for name, value in saved_environment.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def module_from_folder(folder: Path, path: Path, module_name: str) -> ModuleType:
    """``path`` imported as ``module_name``, with ``folder`` first on the path and its modules its own."""
    with script_folder(folder):
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up while the script runs
        spec.loader.exec_module(module)
    return module
