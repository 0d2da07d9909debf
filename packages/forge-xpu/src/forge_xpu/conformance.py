"""forge-core's conformance suite wired to forge-kernels: references and sample inputs per op.

forge-core's suite (:mod:`forge_core.testing.conformance`) cannot import forge-kernels, so it
takes the reference implementations and the inputs for each overridden op from its caller.
This module supplies them for every op a plugin is likely to override::

    from forge_core.testing import conformance
    from forge_xpu.conformance import KERNEL_CASES, reference_for

    conformance.check_kernel_overrides(acc, reference_for=reference_for, kernel_cases=KERNEL_CASES)

Tolerances: float32 is compared at ``torch.testing``'s float32 defaults; bfloat16 at 2e-2
(a vendor kernel may round intermediates to bf16 where the fp32 reference does not).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from forge_core.testing.conformance import KernelCase

__all__ = ["KERNEL_CASES", "reference_for"]

_BF16 = {"atol": 2e-2, "rtol": 2e-2}


def reference_for(op: str) -> Callable[..., Any]:
    """forge-kernels' eager reference of ``op`` (imported on first use)."""
    from forge_kernels import registry

    return registry.get_reference(op)


def _leaf(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape).to(device=device, dtype=dtype).requires_grad_()


def _rms_norm_inputs(residual: bool) -> Callable[..., Any]:
    def make(device: torch.device, dtype: torch.dtype):
        x, w = _leaf((3, 5, 64), device, dtype), _leaf((64,), device, dtype)
        kwargs: dict[str, Any] = {"eps": 1e-6}
        if residual:
            kwargs["residual"] = _leaf((3, 5, 64), device, dtype)
        return (x, w), kwargs

    return make


def _swiglu_inputs(device: torch.device, dtype: torch.dtype):
    return (_leaf((4, 6, 32), device, dtype), _leaf((4, 6, 32), device, dtype)), {}


def _rope_inputs(packed: bool) -> Callable[..., Any]:
    def make(device: torch.device, dtype: torch.dtype):
        head_dim, seq = 16, 6
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.arange(seq).float()[:, None] * inv_freq  # [seq, head_dim // 2]
        cos, sin = angles.cos().to(device), angles.sin().to(device)
        token_dims = (seq,) if packed else (2, seq)
        q = _leaf((*token_dims, 4, head_dim), device, dtype)
        k = _leaf((*token_dims, 2, head_dim), device, dtype)
        return (q, k, cos, sin), {"layout": "half"}

    return make


def _both(make: Callable[..., Any]) -> list[KernelCase]:
    return [
        KernelCase(make_inputs=make, dtypes=(torch.float32,)),
        KernelCase(make_inputs=make, dtypes=(torch.bfloat16,), **_BF16),
    ]


#: Sample inputs per forge-kernels op (several cases per op where the op has several paths).
KERNEL_CASES: dict[str, list[KernelCase]] = {
    "rms_norm": _both(_rms_norm_inputs(residual=False)) + _both(_rms_norm_inputs(residual=True)),
    "swiglu": _both(_swiglu_inputs),
    "apply_rope": _both(_rope_inputs(packed=True)) + _both(_rope_inputs(packed=False)),
}
