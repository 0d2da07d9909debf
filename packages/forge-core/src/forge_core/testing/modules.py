"""Importing a helper module by file path, once per process.

Test suites run with ``--import-mode=importlib`` have no package to import sibling helper files
(a tiny model, a shared training loop) from. :func:`import_path` imports such a file under a
fixed module name and keeps it in ``sys.modules``, so functions and classes defined in it pickle
by reference and the worker pool's processes resolve them to the same module.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["import_path"]


def import_path(path: str | Path, name: str) -> ModuleType:
    """The module at ``path``, imported as ``name`` on first use and cached in ``sys.modules``.

    A module whose import fails is not cached, so the next call raises the same error again.
    """
    module = sys.modules.get(name)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import a module from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
