"""Triton kernels of the FP8 quantizers (see :mod:`forge_kernels.fp8.quantize`).

``block_quant_kernel``: one scale per row tile or square block (DeepSeek-V3 fine-grained
scaling), amax, scale, cast and scale store in one pass. ``tensor_amax_kernel`` then
``tensor_cast_kernel``: per-tensor ("current") scaling in two launches (an atomic-max reduction,
then one pass that scales, casts and writes the FP8 data and, optionally, its transpose), where
the eager ops take a dozen launches and several passes over the tensor.

Casts round to nearest-even and saturate at ``fp8_max``; under ``TRITON_INTERPRET=1`` the
rounding is done in fp32 first (the interpreter's own conversion does not round to nearest-even),
so the kernels and the eager path agree to the bit everywhere.

This module imports Triton at the top: import it lazily, only once :func:`can_use_triton` said
yes (see ``forge_kernels._triton_support``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def scale_from_amax(amax, FP8_MAX: tl.constexpr):
    """``fp8_max / amax``, or 1 where amax is 0 or not finite (as :func:`amax_to_scale`)."""
    ok = (amax > 0.0) & (amax < float("inf"))
    scale = tl.math.div_rn(FP8_MAX, tl.where(ok, amax, 1.0))
    return tl.where(ok, tl.minimum(scale, 3.4028234663852886e38), 1.0)


@triton.jit
def scale_and_cast(
    x, scale, Q_DTYPE: tl.constexpr, FP8_MAX: tl.constexpr, ROUND_IN_FP32: tl.constexpr,
    MANTISSA_BITS: tl.constexpr, MIN_EXP: tl.constexpr,
):  # fmt: skip
    """``cast(clamp(x * scale, -fp8_max, fp8_max))`` with round-to-nearest-even."""
    y = tl.maximum(x * scale, -FP8_MAX, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN
    y = tl.minimum(y, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)  # as torch.clamp
    if not ROUND_IN_FP32:
        return y.to(Q_DTYPE)
    # The interpreter's float -> fp8 conversion does not round to nearest-even (it loses the
    # carry into the exponent) and turns NaN into a finite value, so round to the FP8 grid here,
    # cast exact values, and write NaN's bits (0x7F with the sign, as torch) explicitly.
    bits = y.to(tl.int32, bitcast=True)
    exp = tl.maximum(((bits >> 23) & 0xFF) - 127, MIN_EXP)
    ulp = ((exp - MANTISSA_BITS + 127) << 23).to(tl.float32, bitcast=True)
    r = ((y / ulp + 12582912.0) - 12582912.0) * ulp  # 1.5 * 2**23: rint in fp32
    r = tl.where(r == 0.0, y * 0.0, r)  # keep the sign of zero, as a real cast does
    nan_bits = (((bits >> 24) & 0x80) | 0x7F).to(tl.uint8).to(Q_DTYPE, bitcast=True)
    return tl.where(y == y, r.to(Q_DTYPE), nan_bits)


@triton.jit
def block_quant_kernel(
    X, Q, S,
    n_rows, n_cols,
    stride_xr, stride_xc, stride_qr, stride_sr, stride_sc,
    FP8_MAX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    PER_ROW: tl.constexpr, ROUND_IN_FP32: tl.constexpr,
    MANTISSA_BITS: tl.constexpr, MIN_EXP: tl.constexpr,
):  # fmt: skip
    """Quantize one BLOCK_R x BLOCK_C tile: one scale per row (PER_ROW) or for the tile."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + rows64 * stride_xr + cols[None, :] * stride_xc, mask=mask, other=0.0)
    x = x.to(tl.float32)  # right after the load (the interpreter's bf16 math is wrong)
    ax = tl.abs(x)
    if PER_ROW:
        scale = scale_from_amax(tl.max(ax, axis=1), FP8_MAX)
        q = scale_and_cast(
            x, scale[:, None], Q.dtype.element_ty, FP8_MAX, ROUND_IN_FP32, MANTISSA_BITS,
            MIN_EXP,
        )  # fmt: skip
    else:
        scale = scale_from_amax(tl.max(tl.max(ax, axis=1), axis=0), FP8_MAX)
        q = scale_and_cast(
            x, scale, Q.dtype.element_ty, FP8_MAX, ROUND_IN_FP32, MANTISSA_BITS, MIN_EXP
        )
    tl.store(Q + rows64 * stride_qr + cols[None, :], q, mask=mask)
    scale_inv = tl.math.div_rn(1.0, scale)
    if PER_ROW:
        tl.store(S + rows * stride_sr + pid_c * stride_sc, scale_inv, mask=row_mask)
    else:
        tl.store(S + pid_r * stride_sr + pid_c * stride_sc, scale_inv)


@triton.jit
def tensor_amax_kernel(
    X, AMAX, n_rows, n_cols, stride_xr, stride_xc,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """``AMAX = max(AMAX, max |x| of this tile)``; NaN counts as inf (both mean fallback)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    ptrs = X + rows.to(tl.int64)[:, None] * stride_xr + cols[None, :] * stride_xc
    ax = tl.abs(tl.load(ptrs, mask=mask, other=0.0).to(tl.float32))
    ax = tl.where(ax == ax, ax, float("inf"))
    tl.atomic_max(AMAX, tl.max(tl.max(ax, axis=1), axis=0))


@triton.jit
def tensor_cast_kernel(
    X, Q, QT, SCALE_SRC, SCALE_INV,
    n_rows, n_cols, stride_xr, stride_xc,
    FROM_AMAX: tl.constexpr, WRITE_T: tl.constexpr,
    FP8_MAX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ROUND_IN_FP32: tl.constexpr, MANTISSA_BITS: tl.constexpr, MIN_EXP: tl.constexpr,
):  # fmt: skip
    """Cast one tile with the tensor's scale (from its amax, or given), writing Q (rows x
    cols, row-major) and, with WRITE_T, its transpose QT (cols x rows, row-major)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    scale = tl.load(SCALE_SRC)  # the tensor's amax, or its scale
    if FROM_AMAX:
        scale = scale_from_amax(scale, FP8_MAX)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_xr + cols[None, :] * stride_xc, mask=mask)
    q = scale_and_cast(
        x.to(tl.float32), scale, Q.dtype.element_ty, FP8_MAX, ROUND_IN_FP32, MANTISSA_BITS,
        MIN_EXP,
    )  # fmt: skip
    tl.store(Q + rows64[:, None] * n_cols + cols[None, :], q, mask=mask)
    if WRITE_T:  # transposed in registers, so the store is coalesced along rows
        ptrs_t = QT + cols64[:, None] * n_rows + rows[None, :]
        tl.store(ptrs_t, tl.trans(q), mask=tl.trans(mask))
    if (pid_r == 0) & (pid_c == 0):
        tl.store(SCALE_INV, tl.math.div_rn(1.0, scale))
