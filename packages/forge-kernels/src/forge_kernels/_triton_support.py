"""When a Triton kernel can run on a tensor, and the lazy import of Triton itself."""

from __future__ import annotations

import functools
import os
import sys

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


def _is_dtensor(t: torch.Tensor) -> bool:
    # Without torch.distributed.tensor imported there is no DTensor (importing it costs seconds)
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def plain_tensor(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t``, or the value of a pending functional collective (``AsyncCollectiveTensor``, what
    tensor-parallel layers hand out from ``to_local()``) once it has arrived: a Triton kernel
    reads raw pointers, so it must not get the pending wrapper (it has no storage, and ordinary
    torch ops wait on it through its ``__torch_dispatch__``, which a kernel launch bypasses).

    A wrapper in the autograd graph is cloned (an op through its dispatch: the gradient goes
    back to the collective); ``wait()`` would hand out its inner tensor, cut off from the
    graph."""
    if t is None or type(t) is torch.Tensor:
        return t
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    if not isinstance(t, AsyncCollectiveTensor):
        return t
    return t.clone() if t.requires_grad and torch.is_grad_enabled() else t.wait()


def can_use_triton(*tensors: torch.Tensor) -> bool:
    """True if a Triton kernel can run on all of ``tensors``.

    On CUDA that needs Triton installed; on CPU it needs the interpreter (``TRITON_INTERPRET=1``).
    Everything else (other devices, or CPU without the interpreter) uses the eager path, and so
    does a ``DTensor`` argument (a kernel would see one rank's shard as the whole tensor; the
    eager ops dispatch through its sharding). Pass pending collectives through
    :func:`plain_tensor` first.
    """
    if not triton_importable():
        return False
    if any(_is_dtensor(t) for t in tensors):
        return False
    devices = {t.device.type for t in tensors}
    if devices == {"cuda"}:
        return True
    if devices == {"cpu"}:
        return triton_interpret_mode()
    return False
