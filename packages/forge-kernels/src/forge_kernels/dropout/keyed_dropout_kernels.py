"""The Triton kernel of keyed dropout: ``out = where(keep, inp / (1 - p), 0)`` with the keep
mask hashed in the kernel from each row's token key and each column's feature index, so it
is never stored; one kernel serves the forward (``inp = x``) and the backward (``inp = dy``).

The hash is :func:`forge_kernels.dropout.keyed_dropout.mix32` (murmur3's 32-bit finalizer,
Appleby 2008) in uint32 lanes: Triton's uint32 multiplies wrap mod 2**32 and its right shifts
of unsigned values are logical, the same as the reference's int64 arithmetic masked to 32 bits
(checked bit for bit by the tests, interpreted and compiled for sm90).
"""

from __future__ import annotations

import collections

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is Linux-only; without it every call uses the eager reference.
    triton = None

__all__ = ["KERNEL_LAUNCHES", "keyed_dropout_rows"]

#: Triton kernel launches by kernel name, counted so tests can check the fused path really ran.
KERNEL_LAUNCHES: collections.Counter[str] = collections.Counter()

if triton is not None:

    @triton.jit
    def _mix32(h):
        """murmur3's 32-bit finalizer on uint32 lanes (wrapping multiplies, logical shifts)."""
        h ^= h >> 16
        h *= 0x85EBCA6B
        h ^= h >> 13
        h *= 0xC2B2AE35
        h ^= h >> 16
        return h

    # salt, feature_offset and threshold reach past 2**31 or may equal 1: never specialize them
    # (a value of 1 would become a constexpr, one >= 2**31 an int64 argument instead of int32).
    @triton.jit(do_not_specialize=["salt", "feature_offset", "threshold"])
    def keyed_dropout_kernel(
        INP, KEYS, OUT,
        stride_inp, n_rows, n_cols, salt, feature_offset, threshold, keep_prob,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & (cols < n_cols)[None, :]
        # A key's low 32 bits (padding's -1 is 0xFFFFFFFF, as the reference masks it).
        key = tl.load(KEYS + rows, mask=row_ok, other=0).to(tl.uint32)
        per_token = _mix32(key ^ salt.to(tl.uint32))
        index = (cols.to(tl.int64) + feature_offset).to(tl.uint32)
        per_feature = _mix32(index * 0x61C88647 + 0x7F4A7C15)
        h = _mix32(per_token[:, None] ^ per_feature[None, :])
        keep = h.to(tl.int64) >= threshold
        rows64 = rows.to(tl.int64)[:, None]  # row offsets can pass 2**31 elements
        # Convert right after loading: compute in fp32 (and the interpreter's bf16 math is wrong).
        x = tl.load(INP + rows64 * stride_inp + cols[None, :], mask=mask, other=0.0)
        # div_rn: IEEE division, as torch divides by 1 - p (``/`` compiles to div.full, 2 ulp).
        y = tl.where(keep, tl.div_rn(x.to(tl.float32), keep_prob), 0.0)
        tl.store(OUT + rows64 * n_cols + cols[None, :], y.to(OUT.dtype.element_ty), mask=mask)


def _grid_and_tile(n_rows: int, n_cols: int) -> tuple[tuple[int, int], int, int, int]:
    """Grid and (BLOCK_M, BLOCK_N, num_warps): 4096-element tiles, rows stacked when short."""
    block_n = min(triton.next_power_of_2(n_cols), 1024)
    block_m = max(1, 4096 // block_n)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))
    return grid, block_m, block_n, 8


def keyed_dropout_rows(
    inp: torch.Tensor,
    keys: torch.Tensor,
    *,
    salt: int,
    feature_offset: int,
    threshold: int,
    keep_prob: float,
    kernel_name: str,
) -> torch.Tensor:
    """``where(keep, inp / keep_prob, 0)`` for ``inp`` ``[rows, cols]`` with a unit column
    stride and ``keys`` ``[rows]`` int64 contiguous; a new contiguous ``[rows, cols]`` tensor."""
    n_rows, n_cols = inp.shape
    out = torch.empty((n_rows, n_cols), dtype=inp.dtype, device=inp.device)
    grid, block_m, block_n, num_warps = _grid_and_tile(n_rows, n_cols)
    keyed_dropout_kernel[grid](
        inp, keys, out, inp.stride(0), n_rows, n_cols, salt, feature_offset, threshold,
        keep_prob, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )  # fmt: skip
    KERNEL_LAUNCHES[kernel_name] += 1
    return out
