"""Which Kunlun kernel implements which forge-kernels op, and how its arguments are adapted.

The vendor kernels are XPyTorch's fused autograd functions (``torch_xmlir.nn.*``, over the
``custom_ops`` library XPyTorch loads): they have a backward, which training needs. (The
separate ``xtorch_ops`` wheel that vLLM-Kunlun installs holds inference kernels with
preallocated outputs and no autograd, so it is not used here.)

Kunlunxin publishes no reference for these Python entry points. The calling conventions below
are the ones public code uses on P800 hardware (sources per row); none of them was run by
Forge's authors on a Kunlun device. Each adapter checks what that code found the kernel
accepts and otherwise declines (``FALLBACK``), so the call runs forge-kernels' torch-native
reference instead: a wrong assumption costs speed, not correctness. The conformance suite
(``FORGE_CONFORMANCE_BACKEND=kunlun``) checks every row against the reference on hardware.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from forge_xpu.overrides import FALLBACK, VendorKernel

__all__ = ["KERNEL_DTYPES", "KUNLUN_KERNELS"]

#: Dtypes the fused kernels are given (others fall back): the floating types vLLM-Kunlun's
#: platform accepts (``KunlunPlatform.check_if_supports_dtype``: fp32, fp16, bf16, int8).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fits(device_type: str, *tensors: torch.Tensor) -> bool:
    """Plain (not DTensor or other subclass), non-empty tensors of a kernel dtype on the device."""
    return all(
        type(t) in (torch.Tensor, torch.nn.Parameter)
        and t.device.type == device_type
        and t.dtype in KERNEL_DTYPES
        and t.numel() > 0
        for t in tensors
    )


def rms_norm_adapter(
    vendor: Callable[..., Any],
    device_type: str,
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
) -> Any:
    """forge ``rms_norm(x, weight, eps=, residual=)`` -> ``RMSNormFunction.apply(h, eps, w, False, False)``.

    The kernel normalises one tensor with a 1-D weight of the same dtype; the residual add is
    done here first (``h = x + residual``, as the reference does) and ``(y, h)`` returned.
    """
    if weight is None or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        return FALLBACK
    tensors = [x, weight] if residual is None else [x, weight, residual]
    if any(t.dtype != x.dtype for t in tensors) or not _fits(device_type, *tensors):
        return FALLBACK
    if residual is not None and residual.shape != x.shape:
        return FALLBACK
    h = x if residual is None else x + residual
    y = vendor(h.contiguous(), float(eps), weight.contiguous(), False, False)
    return y if residual is None else (y, h)


def swiglu_adapter(
    vendor: Callable[..., Any], device_type: str, gate: torch.Tensor, up: torch.Tensor
) -> Any:
    """forge ``swiglu(gate, up)`` -> ``SwiGLUFunction.apply(cat([gate, up], -1) as [N, 2d])``.

    The kernel takes Megatron's layout, one 2-D tensor holding the gate then the up half on
    the last dim, and returns ``[N, d]``.
    """
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.dim() < 1:
        return FALLBACK
    if not _fits(device_type, gate, up):
        return FALLBACK
    d = gate.shape[-1]
    packed = torch.cat((gate, up), dim=-1).reshape(-1, 2 * d)
    return vendor(packed).reshape(gate.shape)


def apply_rope_adapter(
    vendor: Callable[..., Any],
    device_type: str,
    q: torch.Tensor,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    layout: str = "half",
    inplace: bool = False,
) -> Any:
    """forge ``apply_rope`` -> ``FusedRoPEFunc.apply(x, None, None, cos4, sin4, cu, "THD", False)``.

    Served: the ``"half"`` (rotate-half) layout, out of place, full rotary dim, q/k as
    ``[tokens, heads, head_dim]`` or ``[batch, seq, heads, head_dim]`` (flattened to tokens).
    The kernel wants cos/sin duplicated to head_dim as ``[T, 1, 1, head_dim]`` in q's dtype,
    int64 ``cu_seqlens`` (one span ``[0, T]``: per-token cos/sin already carry positions) and
    one call per tensor.
    """
    if layout != "half" or inplace or q.dim() not in (3, 4):
        return FALLBACK
    heads = [t for t in (q, k) if t is not None]
    head_dim = q.shape[-1]
    token_shape = tuple(q.shape[:-2])
    if any(t.shape[:-2] != q.shape[:-2] or t.shape[-1] != head_dim for t in heads):
        return FALLBACK
    if cos.shape != sin.shape or 2 * cos.shape[-1] != head_dim:
        return FALLBACK
    if any(t.dtype != q.dtype for t in heads) or not _fits(device_type, *heads, cos, sin):
        return FALLBACK
    try:
        cos = cos.broadcast_to((*token_shape, head_dim // 2))
        sin = sin.broadcast_to((*token_shape, head_dim // 2))
    except RuntimeError:
        return FALLBACK
    tokens = q.shape[:-2].numel()
    cos4 = torch.cat((cos, cos), dim=-1).reshape(tokens, 1, 1, head_dim).to(q.dtype)
    sin4 = torch.cat((sin, sin), dim=-1).reshape(tokens, 1, 1, head_dim).to(q.dtype)
    cu_seqlens = torch.tensor([0, tokens], dtype=torch.int64, device=q.device)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        packed = x.reshape(tokens, x.shape[-2], head_dim).contiguous()
        out, _ = vendor(packed, None, None, cos4, sin4, cu_seqlens, "THD", False)
        return out.reshape(x.shape)

    return rotate(q), None if k is None else rotate(k)


#: The Kunlun kernel table. Ops not listed keep forge-kernels' own implementation.
KUNLUN_KERNELS: tuple[VendorKernel, ...] = (
    VendorKernel(
        op="rms_norm",
        vendor="torch_xmlir.nn.rms_norm:RMSNormFunction.apply",
        adapter=rms_norm_adapter,
        source=(
            "public P800 code calling RMSNormFunction.apply(x, eps, weight, False, False) over "
            "custom_ops.rms_layer_norm / rms_layer_norm_backward (x contiguous, weight 1-D, "
            "same dtype); the two flags' meaning is not documented"
        ),
    ),
    VendorKernel(
        op="swiglu",
        vendor="torch_xmlir.nn.swiglu:SwiGLUFunction.apply",
        adapter=swiglu_adapter,
        source=(
            "Megatron-on-Kunlun plugins calling SwiGLUFunction.apply(input) on input viewed as "
            "[N, 2d] (gate half first, Megatron's bias_swiglu layout), returning [N, d]"
        ),
    ),
    VendorKernel(
        op="apply_rope",
        vendor="torch_xmlir.nn.rope:FusedRoPEFunc.apply",
        adapter=apply_rope_adapter,
        source=(
            "public P800 code calling FusedRoPEFunc.apply(x, None, None, cos, sin, cu_seqlens, "
            "'THD', False) with x [T, H, D], cos/sin [T, 1, 1, D] in x's dtype, int64 "
            "cu_seqlens; interleaved=True is BSHD-only there"
        ),
    ),
)
