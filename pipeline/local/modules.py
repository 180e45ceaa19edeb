"""Import a script as its own runtime would: its sibling modules come from its folder, not from this process.

The inference container and each Lambda function import their scripts with
only their own folder on the path. Here they share one process, so modules
named like the folder's files (``common``, ``contract``) are set aside while
a script imports, so that it binds its own copies, and put back after.
``sys.path`` and ``sys.modules`` are process-wide: one import at a time.
"""
from __future__ import annotations

import importlib.util
import sys
import threading
from pathlib import Path
from types import ModuleType

_IMPORT_LOCK = threading.Lock()


def module_from_folder(folder: Path, path: Path, module_name: str) -> ModuleType:
    """``path`` imported as ``module_name``, with ``folder`` first on the path and its modules its own."""
    siblings = {p.stem for p in folder.glob("*.py")}
    with _IMPORT_LOCK:
        saved_modules = {name: sys.modules.pop(name) for name in siblings if name in sys.modules}
        saved_path = list(sys.path)
        sys.path.insert(0, str(folder))
        try:
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module  # dataclasses look their module up while the script runs
            spec.loader.exec_module(module)
        finally:
            for name in siblings:
                sys.modules.pop(name, None)
            sys.modules.update(saved_modules)
            sys.path[:] = saved_path
    return module
