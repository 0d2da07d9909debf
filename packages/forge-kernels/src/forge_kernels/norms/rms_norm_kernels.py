"""RMSNorm with an optional fused residual add, as one Triton pass forward and one backward.

RMSNorm (Zhang & Sennrich, 2019, "Root Mean Square Layer Normalization", arXiv:1910.07467)
rescales each row by the inverse root mean square of its entries, with no centring and no bias::

    y = weight * x / sqrt(mean(x**2) + eps)

The numerics follow transformers' ``LlamaRMSNorm``: normalise in fp32, cast the normalised row back
to the input dtype, and only then multiply by ``weight`` (so the output dtype is the promotion of the
input's and the weight's, as in transformers).

With ``residual`` the kernel first forms ``h = x + residual`` (rounded to the promoted dtype, as
torch's ``+`` does), normalises ``h`` and returns ``(y, h)`` so the caller can carry the residual
stream on without a separate add kernel (the fused add+norm of flash-attn and Liger-Kernel).

The Triton kernels are used when :func:`forge_kernels._triton_support.can_use_triton` allows
(CUDA, or CPU under ``TRITON_INTERPRET=1``, which must be set before this module is imported);
otherwise :func:`rms_norm_reference` runs. Rows longer than ``MAX_FUSED_HIDDEN`` also use the
reference, since a whole row must fit in one Triton block.
"""

from __future__ import annotations

import collections
import functools

import torch

from forge_kernels import registry
from forge_kernels._triton_support import can_use_triton, plain_tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is Linux-only; without it every call uses the eager reference.
    triton = None

__all__ = ["KERNEL_LAUNCHES", "MAX_FUSED_HIDDEN", "rms_norm", "rms_norm_reference"]

#: Longest normalised dim the fused kernels take (one row per Triton block).
MAX_FUSED_HIDDEN = 65536

#: Dtypes the kernels take (they compute in fp32); others, such as fp64, use the reference.
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Triton kernel launches by kernel name, counted so tests can check the fused path really ran.
KERNEL_LAUNCHES: collections.Counter[str] = collections.Counter()


def _check_args(
    x: torch.Tensor, weight: torch.Tensor | None, residual: torch.Tensor | None
) -> None:
    if x.dim() == 0:
        raise ValueError("rms_norm needs at least 1-D input (it normalises the last dim)")
    hidden = x.shape[-1]
    if weight is not None and tuple(weight.shape) != (hidden,):
        raise ValueError(
            f"rms_norm weight must have shape ({hidden},) to match the last dim of x, "
            f"got {tuple(weight.shape)}"
        )
    if residual is not None and residual.shape != x.shape:
        raise ValueError(
            f"rms_norm residual must have the shape of x {tuple(x.shape)}, "
            f"got {tuple(residual.shape)}; broadcast it explicitly if that is intended"
        )


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Eager PyTorch RMSNorm, cast for cast as transformers' ``LlamaRMSNorm``.

    (One difference: fp64 input is normalised in fp64, where Llama's would drop to fp32.)
    This defines the numerics the Triton kernels are tested against. See :func:`rms_norm`.
    """
    _check_args(x, weight, residual)
    h = x if residual is None else x + residual
    h32 = h.to(torch.promote_types(h.dtype, torch.float32))  # fp32, or fp64 for fp64 input
    normed = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    y = normed if weight is None else weight * normed
    return y if residual is None else (y, h)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _rms_norm_fwd_kernel(
        X, R, W, Y, H, RSTD,
        stride_x, stride_r, stride_y, stride_h,
        n_rows, n_cols, eps,
        HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """Normalise BLOCK_M rows. Without a residual, H is X (the normalised input)."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        rows64 = rows.to(tl.int64)[:, None]  # row offsets can pass 2**31 elements

        # Convert right after loading: accumulate in fp32 (and the interpreter's bf16 math is wrong).
        h = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(R + rows64 * stride_r + cols[None, :], mask=mask, other=0.0)
            # Round the sum to the residual stream's dtype, as torch's `x + residual` does.
            h = (h + r.to(tl.float32)).to(H.dtype.element_ty)
            tl.store(H + rows64 * stride_h + cols[None, :], h, mask=mask)
            h = h.to(tl.float32)

        rstd = tl.rsqrt(tl.sum(h * h, axis=1) / n_cols + eps)
        tl.store(RSTD + rows, rstd, mask=row_mask)
        # LlamaRMSNorm casts the normalised row to the input dtype before the weight multiply.
        y = (h * rstd[:, None]).to(H.dtype.element_ty).to(tl.float32)
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            y = y * w[None, :]
        tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_bwd_kernel(
        DY, DH_OUT, H, W, RSTD, DX, DR, DW_PARTIAL,
        stride_dy, stride_dho, stride_h, stride_dx, stride_dr,
        n_rows, n_cols, rows_per_program,
        HAS_DH_OUT: tl.constexpr, HAS_WEIGHT: tl.constexpr, COMPUTE_DW: tl.constexpr,
        HAS_DR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """Gradients for ``rows_per_program`` consecutive rows; this program's weight-grad partial sum.

        With n = h * rstd and dn = dy * w:  dh = rstd * (dn - n * mean(dn * n)) (+ the gradient of
        the returned residual stream, DH_OUT), and dw = sum over rows of dy * n.
        """
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        col_mask = cols < n_cols
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

        row_start = pid * rows_per_program
        row_end = tl.minimum(row_start + rows_per_program, n_rows)
        for block_start in range(row_start, row_end, BLOCK_M):
            rows = block_start + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            mask = row_mask[:, None] & col_mask[None, :]
            rows64 = rows.to(tl.int64)[:, None]

            h = tl.load(H + rows64 * stride_h + cols[None, :], mask=mask, other=0.0)
            h = h.to(tl.float32)
            dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0)
            dy = dy.to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
            n = h * rstd[:, None]
            if HAS_WEIGHT:
                dn = dy * w[None, :]
                if COMPUTE_DW:
                    # The forward multiplied the weight by n rounded to the input dtype.
                    dw_acc += dy * n.to(H.dtype.element_ty).to(tl.float32)
            else:
                dn = dy
            dh = (dn - n * (tl.sum(dn * n, axis=1) / n_cols)[:, None]) * rstd[:, None]
            if HAS_DH_OUT:
                dho = tl.load(DH_OUT + rows64 * stride_dho + cols[None, :], mask=mask, other=0.0)
                dh += dho.to(tl.float32)
            tl.store(DX + rows64 * stride_dx + cols[None, :], dh.to(DX.dtype.element_ty), mask=mask)
            if HAS_DR:
                tl.store(
                    DR + rows64 * stride_dr + cols[None, :], dh.to(DR.dtype.element_ty), mask=mask
                )

        if COMPUTE_DW:
            tl.store(DW_PARTIAL + pid * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_mask)


# --------------------------------------------------------------------------------------------
# Launch helpers and autograd
# --------------------------------------------------------------------------------------------


def _as_rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """``t`` as a (rows, n_cols) view with unit column stride (copying only when needed)."""
    t2 = t.reshape(-1, n_cols)
    return t2 if t2.stride(-1) == 1 or n_cols == 1 else t2.contiguous()


def _tile(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): whole rows, several per program when rows are short."""
    block_n = triton.next_power_of_2(n_cols)
    block_m = max(1, min(64, 4096 // block_n))
    elems = block_m * block_n
    num_warps = 32 if elems >= 32768 else 16 if elems >= 8192 else 8 if elems >= 2048 else 4
    return block_m, block_n, num_warps


@functools.cache
def _max_programs(device: torch.device) -> int:
    """Programs for the backward's persistent grid: two per SM on CUDA, a few interpreted.

    Each program accumulates one weight-grad partial row; more programs hide more latency but
    make the final ``partial.sum(0)`` longer.
    """
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        n_cols = x.shape[-1]
        x2 = _as_rows(x, n_cols)
        n_rows = x2.shape[0]
        h_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
        y_dtype = h_dtype if weight is None else torch.promote_types(h_dtype, weight.dtype)
        y = torch.empty((n_rows, n_cols), dtype=y_dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        if residual is None:
            r2 = h = x2
        else:
            r2 = _as_rows(residual, n_cols)
            h = torch.empty((n_rows, n_cols), dtype=h_dtype, device=x.device)
        block_m, block_n, num_warps = _tile(n_cols)
        _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
            x2, r2, weight if weight is not None else x2, y, h, rstd,
            x2.stride(0), r2.stride(0), y.stride(0), h.stride(0),
            n_rows, n_cols, eps,
            HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )  # fmt: skip
        KERNEL_LAUNCHES["rms_norm_fwd"] += 1

        ctx.save_for_backward(h, weight, rstd)
        ctx.shape, ctx.has_residual = x.shape, residual is not None
        ctx.x_dtype, ctx.r_dtype = x.dtype, None if residual is None else residual.dtype
        ctx.y_dtype = y_dtype
        ctx.set_materialize_grads(False)
        y = y.view(x.shape)
        return y if residual is None else (y, h.view(x.shape))

    @staticmethod
    def backward(ctx, dy, dh_out=None):
        dy, dh_out = plain_tensor(dy), plain_tensor(dh_out)
        h, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = h.shape
        if dy is None:  # only the returned residual stream was used
            dy = torch.zeros((n_rows, n_cols), dtype=ctx.y_dtype, device=h.device)
        dy2 = _as_rows(dy, n_cols)
        dho2 = None if dh_out is None else _as_rows(dh_out, n_cols)
        # x and residual get the same gradient, but in two buffers (the kernel stores it twice):
        # returning one tensor for both lets AccumulateGrad make it both leaves' .grad, so an
        # in-place update of one would silently change the other.
        need_dr = ctx.has_residual and ctx.needs_input_grad[1]
        compute_dw = weight is not None and ctx.needs_input_grad[2]

        dx = torch.empty((n_rows, n_cols), dtype=ctx.x_dtype, device=h.device)
        dr = torch.empty_like(dx, dtype=ctx.r_dtype) if need_dr else dx
        block_m, block_n, num_warps = _tile(n_cols)
        n_programs = min(_max_programs(h.device), triton.cdiv(n_rows, block_m))
        rows_per_program = triton.cdiv(triton.cdiv(n_rows, n_programs), block_m) * block_m
        n_programs = triton.cdiv(n_rows, rows_per_program)
        dw_partial = (
            torch.empty((n_programs, n_cols), dtype=torch.float32, device=h.device)
            if compute_dw
            else rstd
        )
        _rms_norm_bwd_kernel[(n_programs,)](
            dy2, dho2 if dho2 is not None else dy2, h, weight if weight is not None else h, rstd,
            dx, dr, dw_partial,
            dy2.stride(0), dho2.stride(0) if dho2 is not None else 0, h.stride(0),
            dx.stride(0), dr.stride(0),
            n_rows, n_cols, rows_per_program,
            HAS_DH_OUT=dho2 is not None, HAS_WEIGHT=weight is not None, COMPUTE_DW=compute_dw,
            HAS_DR=need_dr, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )  # fmt: skip
        KERNEL_LAUNCHES["rms_norm_bwd"] += 1

        dw = dw_partial.sum(0).to(weight.dtype) if compute_dw else None
        dx_out = dx.view(ctx.shape) if ctx.needs_input_grad[0] else None
        dr_out = dr.view(ctx.shape) if need_dr else None
        return dx_out, dr_out, dw, None


def _rms_norm_default(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The fused Triton RMSNorm where it can run, else :func:`rms_norm_reference`."""
    x, weight, residual = plain_tensor(x), plain_tensor(weight), plain_tensor(residual)
    _check_args(x, weight, residual)
    tensors = [t for t in (x, weight, residual) if t is not None]
    if (
        x.numel() == 0
        or x.shape[-1] > MAX_FUSED_HIDDEN
        or any(t.dtype not in _KERNEL_DTYPES for t in tensors)
        or not can_use_triton(*tensors)
    ):
        return rms_norm_reference(x, weight, eps=eps, residual=residual)
    return _RMSNormFunction.apply(x, residual, weight, float(eps))


registry.define_op(
    "rms_norm",
    default=_rms_norm_default,
    reference=rms_norm_reference,
    doc="RMSNorm over the last dim with an optional fused residual add (Zhang & Sennrich, 2019).",
)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim of ``x`` (Zhang & Sennrich, 2019), optionally after a residual add.

    Args:
        x: input of any shape ``(..., hidden)``; bf16, fp16 or fp32 (statistics in fp32).
        weight: ``(hidden,)`` scale, or ``None`` for no affine transform.
        eps: added to the mean square before the reciprocal square root.
        residual: optional tensor of ``x``'s shape; the op then normalises ``h = x + residual``.

    Returns:
        ``y`` without ``residual``; with it, ``(y, h)``, where ``h = x + residual`` is the new
        residual stream (computed in the same pass). ``y`` has the dtype of ``h`` promoted with
        ``weight``'s, as transformers' ``LlamaRMSNorm`` does.

    Dispatches through ``registry.get_op("rms_norm")``, so a plugin override takes effect here.
    """
    return registry.get_op("rms_norm")(x, weight, eps=eps, residual=residual)
