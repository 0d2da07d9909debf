"""Autocast semantics for forge-kernels' matmul-like ops.

Under ``torch.autocast`` PyTorch casts the floating-point inputs of its matrix multiplies and of
``scaled_dot_product_attention`` to the autocast dtype (the ops of autocast's lower-precision
list, see PyTorch's "Automatic Mixed Precision" op reference). forge-kernels' ops are Python
functions and custom autograd Functions, which autocast does not see: without this their
inputs arrive in the mixed dtypes autocast leaves behind (an fp32 parameter with bf16
activations, or the fp32 output of an RMSNorm with an fp32 weight next to a bf16 projection),
and the ops that need one dtype refuse them. :func:`autocast_inputs` casts them as autocast
would, visibly to autograd, so gradients flow back in the inputs' own dtypes.
"""

from __future__ import annotations

import torch

__all__ = ["autocast_inputs"]


def autocast_inputs(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """``tensors`` cast to the autocast dtype where autocast is on for their device, as torch
    casts a matmul's inputs; unchanged otherwise (``None``, non-floating and float64 tensors
    pass, and every tensor on a device autocast does not know, such as meta)."""
    first = next((t for t in tensors if t is not None), None)
    if first is None:
        return tensors
    device_type = first.device.type
    # A device autocast does not know (meta: shape-only forwards) has no autocast state.
    if not torch.amp.is_autocast_available(device_type):
        return tensors
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if _cast_by_autocast(t, dtype) else t for t in tensors)


def _cast_by_autocast(t: torch.Tensor | None, dtype: torch.dtype) -> bool:
    """Whether autocast would cast ``t`` to ``dtype``: floating point, not already ``dtype``,
    and not float64 (autocast leaves double precision alone)."""
    return t is not None and t.is_floating_point() and t.dtype not in (dtype, torch.float64)
