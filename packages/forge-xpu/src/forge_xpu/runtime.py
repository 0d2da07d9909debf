"""Finding Kunlunxin's PyTorch runtime (XPyTorch, Python module ``torch_xmlir``) lazily.

XPyTorch is proprietary: Kunlunxin ships it as an installer for a specific Python and torch
version (public instructions: baidu/vLLM-Kunlun ``docs/source/installation.md``), not on PyPI,
so forge-xpu cannot declare it as a dependency. This module imports it only when the Kunlun
backend is selected, and turns its absence into one error that says what to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = [
    "RUNTIME_MODULE",
    "KunlunRuntimeNotFoundError",
    "load_runtime",
    "missing_runtime_message",
]

#: XPyTorch's Python package. Importing it makes the Kunlun device usable through ``torch.cuda``.
RUNTIME_MODULE = "torch_xmlir"


class KunlunRuntimeNotFoundError(ImportError):
    """The Kunlun backend was selected but XPyTorch (``torch_xmlir``) is not importable."""


def missing_runtime_message(cause: BaseException | None = None) -> str:
    reason = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    return (
        "the Forge backend 'kunlun' (forge-xpu) needs Kunlunxin's PyTorch runtime XPyTorch, "
        f"Python module {RUNTIME_MODULE!r}, which cannot be imported here{reason}. XPyTorch is "
        "not on PyPI: install the build for this Python and torch version from Kunlunxin (its "
        "xpytorch-<python>-<torch>-<os>.run installer, or Kunlunxin's development container "
        "image) on a host with a Kunlun XPU and its driver (/dev/xpu* visible); see 'Kunlun "
        f"set-up' in forge-xpu's README. Check with `python -c \"import {RUNTIME_MODULE}\"`. "
        "Without Kunlun hardware, unset FORGE_ACCELERATOR or select 'cpu'."
    )


def load_runtime() -> ModuleType:
    """Import and return ``torch_xmlir``; raises :class:`KunlunRuntimeNotFoundError` if it cannot."""
    try:
        return importlib.import_module(RUNTIME_MODULE)
    except ImportError as exc:
        raise KunlunRuntimeNotFoundError(missing_runtime_message(exc)) from exc
