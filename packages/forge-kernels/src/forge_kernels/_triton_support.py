"""When a Triton kernel can run on a tensor, and the lazy import of Triton itself."""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpret_mode() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton runs kernels on CPU tensors (slowly, for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def can_use_triton(*tensors: torch.Tensor) -> bool:
    """True if a Triton kernel can run on all of ``tensors``.

    On CUDA that needs Triton installed; on CPU it needs the interpreter (``TRITON_INTERPRET=1``).
    Everything else (other devices, or CPU without the interpreter) uses the eager path.
    """
    if not triton_importable():
        return False
    devices = {t.device.type for t in tensors}
    if devices == {"cuda"}:
        return True
    if devices == {"cpu"}:
        return triton_interpret_mode()
    return False
