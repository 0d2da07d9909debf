"""Gated linear units fused with their elementwise product: SwiGLU and GeGLU.

The GLU variants of Shazeer (2020, "GLU Variants Improve Transformer", arXiv:2002.05202) gate one
projection of the input with an activation of another::

    swiglu(gate, up) = silu(gate) * up
    geglu(gate, up)  = gelu(gate) * up      (exact erf GELU, or its tanh approximation)

One Triton kernel computes the activation and the product in fp32 and rounds once to the output
dtype; the backward kernel recomputes the activation from the saved ``gate`` instead of storing it.
``gate`` and ``up`` may be strided views with a unit last-dim stride (such as the two halves of a
fused gate/up projection from ``torch.chunk``): they are read in place, not copied.

The Triton kernels are used when :func:`forge_kernels._triton_support.can_use_triton` allows
(CUDA, or CPU under ``TRITON_INTERPRET=1``, which must be set before this module is imported);
otherwise the eager references run.
"""

from __future__ import annotations

import collections
from typing import Literal

import torch
import torch.nn.functional as F

from forge_kernels import registry
from forge_kernels._triton_support import can_use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is Linux-only; without it every call uses the eager reference.
    triton = None

__all__ = ["KERNEL_LAUNCHES", "geglu", "geglu_reference", "swiglu", "swiglu_reference"]

#: Dtypes the kernels take (they compute in fp32); others, such as fp64, use the reference.
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Triton kernel launches by kernel name, counted so tests can check the fused path really ran.
KERNEL_LAUNCHES: collections.Counter[str] = collections.Counter()

# Activation codes shared by the Python side and the kernels' ACT constexpr.
_SILU, _GELU_TANH, _GELU_ERF = 0, 1, 2
_GELU_CODES = {"tanh": _GELU_TANH, "none": _GELU_ERF}


def _check_args(op: str, gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape:
        raise ValueError(
            f"{op} needs gate and up of the same shape, got {tuple(gate.shape)} and "
            f"{tuple(up.shape)}; split a fused projection with torch.chunk(2, dim=-1)"
        )


def _check_approximate(approximate: str) -> None:
    if approximate not in _GELU_CODES:
        raise ValueError(
            f"geglu approximate must be 'none' or 'tanh' (as F.gelu), got {approximate!r}"
        )


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Eager PyTorch SwiGLU: ``silu(gate) * up`` in fp32 (fp64 for fp64), rounded once."""
    _check_args("swiglu", gate, up)
    out_dtype = torch.promote_types(gate.dtype, up.dtype)
    compute_dtype = torch.promote_types(out_dtype, torch.float32)
    return (F.silu(gate.to(compute_dtype)) * up.to(compute_dtype)).to(out_dtype)


def geglu_reference(
    gate: torch.Tensor, up: torch.Tensor, *, approximate: Literal["none", "tanh"] = "none"
) -> torch.Tensor:
    """Eager PyTorch GeGLU: ``gelu(gate) * up`` in fp32 (fp64 for fp64), rounded once."""
    _check_args("geglu", gate, up)
    _check_approximate(approximate)
    out_dtype = torch.promote_types(gate.dtype, up.dtype)
    compute_dtype = torch.promote_types(out_dtype, torch.float32)
    act = F.gelu(gate.to(compute_dtype), approximate=approximate)
    return (act * up.to(compute_dtype)).to(out_dtype)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _activation_and_grad(g, ACT: tl.constexpr):
        """(act(g), act'(g)) in fp32 for the ACT code; the forward lets the compiler drop act'."""
        if ACT == 0:  # silu(g) = g * sigmoid(g)
            s = tl.sigmoid(g)
            act = g * s
            dact = s * (1.0 + g * (1.0 - s))
        elif ACT == 1:  # gelu, tanh approximation: 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))
            sqrt_2_over_pi = 0.7978845608028654
            inner = sqrt_2_over_pi * g * (1.0 + 0.044715 * g * g)
            t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0  # tanh(inner), without libdevice
            act = 0.5 * g * (1.0 + t)
            dact = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * sqrt_2_over_pi * (
                1.0 + 3.0 * 0.044715 * g * g
            )
        else:  # exact gelu: g * Phi(g) = 0.5 g (1 + erf(g / sqrt(2)))
            cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
            act = g * cdf
            dact = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327  # + g * pdf(g)
        return act, dact

    @triton.jit
    def _glu_fwd_kernel(
        G, U, OUT,
        stride_g, stride_u, n_rows, n_cols,
        ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        rows64 = rows.to(tl.int64)[:, None]  # row offsets can pass 2**31 elements
        # Convert right after loading: compute in fp32 (and the interpreter's bf16 math is wrong).
        g = tl.load(G + rows64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + rows64 * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        act, _ = _activation_and_grad(g, ACT)
        out = act * u
        tl.store(OUT + rows64 * n_cols + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _glu_bwd_kernel(
        DOUT, G, U, DG, DU,
        stride_do, stride_g, stride_u, n_rows, n_cols,
        ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """d gate = dout * up * act'(gate), d up = dout * act(gate), recomputing act from gate."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        do = tl.load(DOUT + rows64 * stride_do + cols[None, :], mask=mask, other=0.0)
        do = do.to(tl.float32)
        g = tl.load(G + rows64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + rows64 * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        act, dact = _activation_and_grad(g, ACT)
        offs = rows64 * n_cols + cols[None, :]
        tl.store(DG + offs, (do * u * dact).to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + offs, (do * act).to(DU.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launch helpers and autograd
# --------------------------------------------------------------------------------------------


def _as_rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """``t`` as a (rows, n_cols) view with unit column stride (copying only when needed)."""
    t2 = t.reshape(-1, n_cols)
    return t2 if t2.stride(-1) == 1 or n_cols == 1 else t2.contiguous()


def _grid_and_tile(n_rows: int, n_cols: int) -> tuple[tuple[int, int], int, int, int]:
    """Grid and (BLOCK_M, BLOCK_N, num_warps): 4096-element tiles, rows stacked when short."""
    block_n = min(triton.next_power_of_2(n_cols), 2048)
    block_m = max(1, 4096 // block_n)
    num_warps = 8
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))
    return grid, block_m, block_n, num_warps


class _GLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, act):
        n_cols = gate.shape[-1]
        g2, u2 = _as_rows(gate, n_cols), _as_rows(up, n_cols)
        n_rows = g2.shape[0]
        out_dtype = torch.promote_types(gate.dtype, up.dtype)
        out = torch.empty((n_rows, n_cols), dtype=out_dtype, device=gate.device)
        grid, block_m, block_n, num_warps = _grid_and_tile(n_rows, n_cols)
        _glu_fwd_kernel[grid](
            g2, u2, out, g2.stride(0), u2.stride(0), n_rows, n_cols,
            ACT=act, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )  # fmt: skip
        KERNEL_LAUNCHES["glu_fwd"] += 1
        ctx.save_for_backward(g2, u2)
        ctx.act, ctx.shape = act, gate.shape
        return out.view(gate.shape)

    @staticmethod
    def backward(ctx, dout):
        g2, u2 = ctx.saved_tensors
        n_rows, n_cols = g2.shape
        do2 = _as_rows(dout, n_cols)
        dg = torch.empty((n_rows, n_cols), dtype=g2.dtype, device=g2.device)
        du = torch.empty((n_rows, n_cols), dtype=u2.dtype, device=u2.device)
        grid, block_m, block_n, num_warps = _grid_and_tile(n_rows, n_cols)
        _glu_bwd_kernel[grid](
            do2, g2, u2, dg, du, do2.stride(0), g2.stride(0), u2.stride(0), n_rows, n_cols,
            ACT=ctx.act, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )  # fmt: skip
        KERNEL_LAUNCHES["glu_bwd"] += 1
        return dg.view(ctx.shape), du.view(ctx.shape), None


def _use_triton(gate: torch.Tensor, up: torch.Tensor) -> bool:
    return (
        gate.dim() > 0
        and gate.numel() > 0
        and gate.dtype in _KERNEL_DTYPES
        and up.dtype in _KERNEL_DTYPES
        and can_use_triton(gate, up)
    )


def _swiglu_default(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The fused Triton SwiGLU where it can run, else :func:`swiglu_reference`."""
    _check_args("swiglu", gate, up)
    if not _use_triton(gate, up):
        return swiglu_reference(gate, up)
    return _GLUFunction.apply(gate, up, _SILU)


def _geglu_default(
    gate: torch.Tensor, up: torch.Tensor, *, approximate: Literal["none", "tanh"] = "none"
) -> torch.Tensor:
    """The fused Triton GeGLU where it can run, else :func:`geglu_reference`."""
    _check_args("geglu", gate, up)
    _check_approximate(approximate)
    if not _use_triton(gate, up):
        return geglu_reference(gate, up, approximate=approximate)
    return _GLUFunction.apply(gate, up, _GELU_CODES[approximate])


registry.define_op(
    "swiglu",
    default=_swiglu_default,
    reference=swiglu_reference,
    doc="silu(gate) * up, fused (Shazeer, 2020).",
)
registry.define_op(
    "geglu",
    default=_geglu_default,
    reference=geglu_reference,
    doc="gelu(gate) * up, fused, exact or tanh GELU (Shazeer, 2020).",
)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU product ``silu(gate) * up`` (Shazeer, 2020), fused forward and backward.

    Args:
        gate: pre-activation, any shape; bf16, fp16 or fp32 (computed in fp32).
        up: the linear branch, same shape as ``gate``.

    Returns:
        A tensor of ``gate``'s shape in the promotion of the two dtypes.

    Dispatches through ``registry.get_op("swiglu")``, so a plugin override takes effect here.
    """
    return registry.get_op("swiglu")(gate, up)


def geglu(
    gate: torch.Tensor, up: torch.Tensor, *, approximate: Literal["none", "tanh"] = "none"
) -> torch.Tensor:
    """GeGLU product ``gelu(gate) * up`` (Shazeer, 2020), fused forward and backward.

    Args:
        gate: pre-activation, any shape; bf16, fp16 or fp32 (computed in fp32).
        up: the linear branch, same shape as ``gate``.
        approximate: ``"none"`` for the exact erf GELU, ``"tanh"`` for the tanh approximation
            (Gemma's ``gelu_pytorch_tanh``); the same values ``torch.nn.functional.gelu`` takes.

    Returns:
        A tensor of ``gate``'s shape in the promotion of the two dtypes.

    Dispatches through ``registry.get_op("geglu")``, so a plugin override takes effect here.
    """
    return registry.get_op("geglu")(gate, up, approximate=approximate)
