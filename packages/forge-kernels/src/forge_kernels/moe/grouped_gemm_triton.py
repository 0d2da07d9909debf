"""Triton grouped GEMM over experts: the kernels behind ``grouped_mm(..., backend="triton")``.

Imported lazily by :mod:`forge_kernels.moe.grouped_gemm` (this module needs Triton). Two kernels
cover the forward and both backward GEMMs of ``y[rows of e] = x[rows of e] @ w[e]``:

- ``_grouped_mm_kernel`` (forward, and ``dx = dy @ w[e]^T`` with the weight's strides swapped):
  one program per ``BLOCK_M x BLOCK_N`` output tile. Tiles are numbered expert by expert, each
  expert owning ``cdiv(count_e, BLOCK_M)`` row tiles; a program finds its expert from the counts
  with an in-register prefix sum, so the launch grid is the static bound
  ``cdiv(T, BLOCK_M) + E`` row tiles and nothing is synchronised with the host. Experts with no
  tokens own no tiles; surplus programs exit at once.
- ``_grouped_mm_dw_kernel`` (``dw[e] = x[rows of e]^T @ dy[rows of e]``): one program per
  ``BLOCK_K x BLOCK_N`` tile of one expert's weight gradient, looping over that expert's rows; an
  expert with no tokens gets zeros.

Inputs are read in their own dtype and multiplied on tensor cores with fp32 accumulation (on CPU
under ``TRITON_INTERPRET=1`` they are converted to fp32 first: the interpreter's bf16 ``tl.dot`` is
wrong). fp32 inputs use TF32 only when ``torch.backends.cuda.matmul.allow_tf32`` says so, as
``torch.matmul`` does. Row offsets are 64-bit.
"""

from __future__ import annotations

import collections

import torch
import triton
import triton.language as tl

from forge_kernels._triton_support import triton_interpret_mode

__all__ = ["KERNEL_LAUNCHES", "grouped_mm_dw", "grouped_mm_fwd"]

#: Triton kernel launches by kernel name, counted so tests can check the Triton path really ran.
KERNEL_LAUNCHES: collections.Counter[str] = collections.Counter()


def _configs(block_ms, block_ns, block_ks, stages_warps):
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_stages=s, num_warps=w)
        for m in block_ms
        for n in block_ns
        for k in block_ks
        for s, w in stages_warps
    ]


if triton_interpret_mode():
    # One config (every autotune candidate would run interpreted), with few large programs: the
    # interpreter's cost is per operation, not per element.
    _FWD_CONFIGS = _configs([32], [32], [32], [(1, 4)])
    _DW_CONFIGS = [
        triton.Config({"BLOCK_K": 32, "BLOCK_N": 32, "BLOCK_T": 32}, num_stages=1, num_warps=4)
    ]
else:
    _FWD_CONFIGS = _configs([64, 128], [128, 256], [64], [(3, 8), (4, 4)])
    _DW_CONFIGS = [
        triton.Config({"BLOCK_K": bk, "BLOCK_N": bn, "BLOCK_T": 64}, num_stages=s, num_warps=w)
        for bk, bn in ((64, 128), (128, 128), (128, 64))
        for s, w in ((3, 8), (4, 4))
    ]


@triton.jit
def _expert_of_tile(COUNTS, n_experts, tile, BLOCK_M: tl.constexpr, E_BLOCK: tl.constexpr):
    """(expert, its first row, its row count, the tile's index within it) of row tile ``tile``."""
    experts = tl.arange(0, E_BLOCK)
    counts = tl.load(COUNTS + experts, mask=experts < n_experts, other=0).to(tl.int64)
    tiles_incl = tl.cumsum((counts + BLOCK_M - 1) // BLOCK_M, axis=0)
    expert = tl.sum((tiles_incl <= tile).to(tl.int32), axis=0)
    is_e = experts == expert
    first_tile = tl.sum(tl.where(is_e, tiles_incl - (counts + BLOCK_M - 1) // BLOCK_M, 0), axis=0)
    row_start = tl.sum(tl.where(experts < expert, counts, 0), axis=0)
    n_rows = tl.sum(tl.where(is_e, counts, 0), axis=0)
    return expert, row_start, n_rows, tile - first_tile


@triton.autotune(configs=_FWD_CONFIGS, key=["N", "K", "TRANSPOSED_B"])
@triton.jit
def _grouped_mm_kernel(
    A, B, C, COUNTS,
    n_experts, N, K,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
    TRANSPOSED_B: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    E_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """C[rows of e] = A[rows of e] @ B[e]; B[e] is (K, N) through its strides."""
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    tile_m = pid // n_tiles_n
    tile_n = pid % n_tiles_n
    expert, row_start, n_rows, local_tile = _expert_of_tile(
        COUNTS, n_experts, tile_m, BLOCK_M, E_BLOCK
    )
    if expert < n_experts:
        local_rows = local_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = local_rows < n_rows
        rows = (row_start + local_rows).to(tl.int64)
        cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        b_base = B + expert.to(tl.int64) * stride_be
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k_start in range(0, K, BLOCK_K):
            ks = k_start + tl.arange(0, BLOCK_K)
            k_mask = ks < K
            a = tl.load(
                A + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                mask=row_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            b = tl.load(
                b_base + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                mask=k_mask[:, None] & col_mask[None, :],
                other=0.0,
            )
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        tl.store(
            C + rows[:, None] * stride_cm + cols[None, :] * stride_cn,
            acc.to(C.dtype.element_ty),
            mask=row_mask[:, None] & col_mask[None, :],
        )


@triton.autotune(configs=_DW_CONFIGS, key=["N", "K"])
@triton.jit
def _grouped_mm_dw_kernel(
    X, DY, DW, OFFSETS,
    N, K,
    stride_xm, stride_xk, stride_dym, stride_dyn, stride_we, stride_wk, stride_wn,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """DW[e] = X[rows of e]^T @ DY[rows of e]; DW[e] is (K, N) through its strides."""
    expert = tl.program_id(0)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    tile_k = tl.program_id(1) // n_tiles_n
    tile_n = tl.program_id(1) % n_tiles_n
    row_start = tl.load(OFFSETS + expert)
    row_end = tl.load(OFFSETS + expert + 1)
    ks = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask = ks < K
    col_mask = cols < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for t_start in range(row_start, row_end, BLOCK_T):
        rows = t_start + tl.arange(0, BLOCK_T)
        row_mask = rows < row_end
        rows64 = rows.to(tl.int64)
        x_t = tl.load(
            X + rows64[None, :] * stride_xm + ks[:, None] * stride_xk,
            mask=k_mask[:, None] & row_mask[None, :],
            other=0.0,
        )
        dy = tl.load(
            DY + rows64[:, None] * stride_dym + cols[None, :] * stride_dyn,
            mask=row_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        if UPCAST:
            x_t = x_t.to(tl.float32)
            dy = dy.to(tl.float32)
        acc = tl.dot(x_t, dy, acc, input_precision=INPUT_PRECISION)
    tl.store(
        DW + expert.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
        acc.to(DW.dtype.element_ty),
        mask=k_mask[:, None] & col_mask[None, :],
    )


def _precision(dtype: torch.dtype) -> tuple[bool, str]:
    """(UPCAST, INPUT_PRECISION) for operands of ``dtype``."""
    if triton_interpret_mode():
        return True, "ieee"
    if dtype == torch.float32:
        return False, "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    # fp16 / bf16: Triton's default precision, plain tensor-core MMA (the choice matters for fp32).
    return False, "tf32"


def grouped_mm_fwd(
    a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor, *, out_dtype: torch.dtype
) -> torch.Tensor:
    """``c[rows of e] = a[rows of e] @ b[e]`` for ``a [T, K]``, ``b [E, K, N]`` (any strides)."""
    num_rows, k_dim = a.shape
    n_experts, _, n_dim = b.shape
    c = torch.empty((num_rows, n_dim), dtype=out_dtype, device=a.device)
    if num_rows == 0 or n_dim == 0:
        return c
    upcast, precision = _precision(a.dtype)
    transposed = b.stride(1) == 1 and b.stride(2) != 1

    def grid(meta):
        row_tiles = triton.cdiv(num_rows, meta["BLOCK_M"]) + n_experts
        return (row_tiles * triton.cdiv(n_dim, meta["BLOCK_N"]),)

    _grouped_mm_kernel[grid](
        a, b, c, counts,
        n_experts, n_dim, k_dim,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        TRANSPOSED_B=transposed, UPCAST=upcast, INPUT_PRECISION=precision,
        E_BLOCK=triton.next_power_of_2(n_experts),
    )  # fmt: skip
    return c


def grouped_mm_dw(
    x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, dw: torch.Tensor
) -> torch.Tensor:
    """Fill ``dw [E, K, N]`` (any strides) with ``x[rows of e]^T @ dy[rows of e]``; return it.

    ``offsets`` is int64 ``[E + 1]``: expert ``e``'s rows are ``offsets[e]:offsets[e + 1]``.
    """
    n_experts, k_dim, n_dim = dw.shape
    if dw.numel() == 0:
        return dw
    upcast, precision = _precision(x.dtype)

    def grid(meta):
        return (
            n_experts,
            triton.cdiv(k_dim, meta["BLOCK_K"]) * triton.cdiv(n_dim, meta["BLOCK_N"]),
        )

    _grouped_mm_dw_kernel[grid](
        x, dy, dw, offsets,
        n_dim, k_dim,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
        dw.stride(0), dw.stride(1), dw.stride(2),
        UPCAST=upcast, INPUT_PRECISION=precision,
    )  # fmt: skip
    return dw
