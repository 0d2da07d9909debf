"""Bit-for-bit tensor comparison, for "bit-exact" checks and for copies that must be identical.

``torch.equal`` compares values: a NaN never equals itself and ``-0.0 == 0.0``. A conversion
check that calls itself bit-exact, or a check that Megatron's replicated copies agree, must
compare the bits instead: a checkpoint holding a NaN (a diverged run) is identical to its copy,
and a ``-0.0`` that became ``0.0`` is not.
"""

from __future__ import annotations

import torch

__all__ = ["differing_elements", "identical"]

_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _raw(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bit patterns as integers of the same size (a view; other tensors unchanged)."""
    if t.is_floating_point() or t.is_complex():
        if t.is_complex():
            t = torch.view_as_real(t)
        return t.view(_SAME_SIZE_INT[t.element_size()])
    return t


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (NaN payloads and signed zeros included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_raw(a), _raw(b))


def differing_elements(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many elements of two same-dtype, same-shape tensors differ in their bits."""
    ra, rb = _raw(a), _raw(b)
    diff = ra != rb
    if a.is_complex():  # a complex element is two raw numbers
        diff = diff.any(dim=-1)
    return int(diff.sum())
