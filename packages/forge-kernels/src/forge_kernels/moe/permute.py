"""Token permutation for dropless mixture-of-experts: group tokens by expert, and back.

:func:`moe_permute` copies each token once per chosen expert into one ``[tokens * top_k, hidden]``
buffer sorted by expert (stably: within an expert, by token then slot), so every expert's rows are
contiguous and one grouped GEMM (:func:`forge_kernels.moe.grouped_mm`) runs all experts without
padding or dropping tokens (MegaBlocks, Gale et al. 2022, arXiv:2211.15841). It also returns the
per-expert counts and offsets, which are the grouped GEMM's group sizes and an expert-parallel
all-to-all's split sizes.

:func:`moe_unpermute` is the inverse: each token gathers its ``top_k`` expert outputs and sums them,
weighted by the routing weights, accumulating in fp32 and rounding once. Both ops are
differentiable; the unpermute's backward also gives the routing weights their gradient
(``<d_out[token], expert_out[row]>`` per slot), so the router learns through it.

Every kernel is a gather (no atomics, so results are deterministic):

- ``_gather_rows_kernel``: sorted row ``r`` <- token row ``slot(r) // top_k``, optionally scaled
  by the slot's weight and dotted with a second buffer (permute forward; unpermute backward);
- ``_combine_rows_kernel``: token ``t`` <- sum over slots ``j`` of ``w[t, j] * rows[pos[t, j]]``
  (unpermute forward, unweighted for the permute backward).

The Triton kernels run where :func:`forge_kernels._triton_support.can_use_triton` allows (CUDA, or
CPU under ``TRITON_INTERPRET=1``); elsewhere :func:`moe_permute_reference` /
:func:`moe_unpermute_reference` (``index_select`` and a weighted sum) run.
"""

from __future__ import annotations

import collections
from typing import NamedTuple

import torch

from forge_kernels import registry
from forge_kernels._triton_support import can_use_triton
from forge_kernels.moe.routing import count_tokens_per_expert

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is Linux-only; without it every call uses the eager reference.
    triton = None

__all__ = [
    "KERNEL_LAUNCHES",
    "MoEPermutation",
    "moe_permute",
    "moe_permute_reference",
    "moe_unpermute",
    "moe_unpermute_reference",
]

#: Dtypes the kernels take (they move data as is and accumulate in fp32).
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Triton kernel launches by kernel name, counted so tests can check the Triton path really ran.
KERNEL_LAUNCHES: collections.Counter[str] = collections.Counter()


class MoEPermutation(NamedTuple):
    """What :func:`moe_permute` returns.

    Attributes:
        hidden: ``[tokens * top_k, hidden]`` token rows sorted by expert.
        sorted_slots: int64 ``[tokens * top_k]``: for each sorted row, the flat slot
            ``token * top_k + j`` it holds (its token is ``sorted_slots // top_k``).
        slot_positions: int64 ``[tokens, top_k]``: the sorted row of each (token, slot), the
            inverse of ``sorted_slots``; what :func:`moe_unpermute` takes.
        tokens_per_expert: int64 ``[experts]`` rows per expert (grouped GEMM group sizes,
            expert-parallel all-to-all split sizes).
        expert_offsets: int64 ``[experts + 1]``: expert ``e``'s rows are
            ``hidden[expert_offsets[e]:expert_offsets[e + 1]]``.
    """

    hidden: torch.Tensor
    sorted_slots: torch.Tensor
    slot_positions: torch.Tensor
    tokens_per_expert: torch.Tensor
    expert_offsets: torch.Tensor


def _check_permute_args(hidden: torch.Tensor, expert_indices: torch.Tensor, num_experts: int):
    if hidden.dim() != 2:
        raise ValueError(
            f"moe_permute needs hidden states [tokens, hidden], got {tuple(hidden.shape)}; "
            "flatten the batch with hidden.reshape(-1, hidden.shape[-1])"
        )
    if expert_indices.dim() != 2 or expert_indices.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"moe_permute needs expert_indices [tokens, top_k] with tokens={hidden.shape[0]}, "
            f"got {tuple(expert_indices.shape)}"
        )
    if expert_indices.dtype.is_floating_point or expert_indices.dtype == torch.bool:
        raise ValueError(f"expert_indices must be an integer tensor, got {expert_indices.dtype}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be positive, got {num_experts}")


def _check_unpermute_args(
    hidden_sorted: torch.Tensor, slot_positions: torch.Tensor, routing_weights: torch.Tensor | None
):
    if hidden_sorted.dim() != 2:
        raise ValueError(
            f"moe_unpermute needs expert outputs [tokens * top_k, hidden], got "
            f"{tuple(hidden_sorted.shape)}"
        )
    if slot_positions.dim() != 2 or slot_positions.numel() != hidden_sorted.shape[0]:
        raise ValueError(
            f"moe_unpermute needs slot_positions [tokens, top_k] (MoEPermutation.slot_positions) "
            f"with tokens * top_k = {hidden_sorted.shape[0]} rows, got {tuple(slot_positions.shape)}"
        )
    if routing_weights is not None and routing_weights.shape != slot_positions.shape:
        raise ValueError(
            f"routing_weights must have the shape of slot_positions {tuple(slot_positions.shape)} "
            f"([tokens, top_k]), got {tuple(routing_weights.shape)}"
        )


def _routing_maps(expert_indices: torch.Tensor, num_experts: int):
    """(sorted_slots, slot_positions, tokens_per_expert, expert_offsets) of a top-k choice."""
    flat = expert_indices.reshape(-1).to(torch.int64)
    sorted_slots = torch.argsort(flat, stable=True)
    positions = torch.empty_like(sorted_slots)
    positions.scatter_(0, sorted_slots, torch.arange(flat.numel(), device=flat.device))
    counts = count_tokens_per_expert(flat, num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    torch.cumsum(counts, dim=0, out=offsets[1:])
    return sorted_slots, positions.view(expert_indices.shape), counts, offsets


def _inverse(slot_positions: torch.Tensor) -> torch.Tensor:
    """``sorted_slots`` from ``slot_positions`` (the inverse permutation)."""
    flat = slot_positions.reshape(-1).to(torch.int64)
    inverse = torch.empty_like(flat)
    return inverse.scatter_(0, flat, torch.arange(flat.numel(), device=flat.device))


# --------------------------------------------------------------------------------------------
# Eager references
# --------------------------------------------------------------------------------------------


def moe_permute_reference(
    hidden: torch.Tensor, expert_indices: torch.Tensor, *, num_experts: int
) -> MoEPermutation:
    """Eager PyTorch permutation (``index_select``); see :func:`moe_permute`."""
    _check_permute_args(hidden, expert_indices, num_experts)
    sorted_slots, positions, counts, offsets = _routing_maps(expert_indices, num_experts)
    top_k = expert_indices.shape[1]
    return MoEPermutation(
        hidden.index_select(0, sorted_slots // top_k), sorted_slots, positions, counts, offsets
    )


def moe_unpermute_reference(
    hidden_sorted: torch.Tensor,
    slot_positions: torch.Tensor,
    *,
    routing_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eager PyTorch un-permutation and weighted combine (in fp32); see :func:`moe_unpermute`."""
    _check_unpermute_args(hidden_sorted, slot_positions, routing_weights)
    num_tokens, top_k = slot_positions.shape
    compute_dtype = torch.promote_types(hidden_sorted.dtype, torch.float32)
    rows = hidden_sorted.index_select(0, slot_positions.reshape(-1).to(torch.int64))
    rows = rows.view(num_tokens, top_k, hidden_sorted.shape[1]).to(compute_dtype)
    if routing_weights is not None:
        rows = rows * routing_weights.to(compute_dtype).unsqueeze(-1)
    return rows.sum(dim=1).to(hidden_sorted.dtype)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _gather_rows_kernel(
        SRC, DST, SLOTS, W, OTHER, DOT,
        stride_src, stride_dst, stride_other,
        n_rows, n_cols,
        TOP_K: tl.constexpr, HAS_WEIGHTS: tl.constexpr, COMPUTE_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """DST[r] = W[s] * SRC[s // TOP_K] with s = SLOTS[r]; DOT[s] = <SRC[s // TOP_K], OTHER[r]>.

        Permute forward (no weights, no dot) and unpermute backward (SRC = d_out: the expert
        outputs' gradient and, with OTHER = the expert outputs, the routing weights' gradient).
        """
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        slots = tl.load(SLOTS + rows, mask=row_mask, other=0)
        src_rows = (slots // TOP_K).to(tl.int64)[:, None]
        dst_rows = rows.to(tl.int64)[:, None]
        if HAS_WEIGHTS:
            w = tl.load(W + slots, mask=row_mask, other=0.0).to(tl.float32)
        if COMPUTE_DOT:
            dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for col_start in range(0, n_cols, BLOCK_N):
            cols = col_start + tl.arange(0, BLOCK_N)
            mask = row_mask[:, None] & (cols < n_cols)[None, :]
            # Convert right after loading (the interpreter's bf16 arithmetic is wrong).
            x = tl.load(SRC + src_rows * stride_src + cols[None, :], mask=mask, other=0.0)
            x = x.to(tl.float32)
            if COMPUTE_DOT:
                o = tl.load(OTHER + dst_rows * stride_other + cols[None, :], mask=mask, other=0.0)
                dot += tl.sum(x * o.to(tl.float32), axis=1)
            if HAS_WEIGHTS:
                x = x * w[:, None]
            tl.store(
                DST + dst_rows * stride_dst + cols[None, :], x.to(DST.dtype.element_ty), mask=mask
            )
        if COMPUTE_DOT:
            tl.store(DOT + slots, dot, mask=row_mask)

    @triton.jit
    def _combine_rows_kernel(
        SRC, DST, POSITIONS, W,
        stride_src, stride_dst,
        n_tokens, n_cols,
        TOP_K: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """DST[t] = sum_j W[t, j] * SRC[POSITIONS[t, j]], accumulated in fp32, rounded once.

        Unpermute forward (SRC = expert outputs) and, without weights, permute backward.
        """
        tokens = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        token_mask = tokens < n_tokens
        dst_rows = tokens.to(tl.int64)[:, None]
        for col_start in range(0, n_cols, BLOCK_N):
            cols = col_start + tl.arange(0, BLOCK_N)
            mask = token_mask[:, None] & (cols < n_cols)[None, :]
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(TOP_K):
                pos = tl.load(POSITIONS + tokens * TOP_K + j, mask=token_mask, other=0)
                x = tl.load(SRC + pos.to(tl.int64)[:, None] * stride_src + cols[None, :], mask=mask)
                x = x.to(tl.float32)
                if HAS_WEIGHTS:
                    w = tl.load(W + tokens * TOP_K + j, mask=token_mask, other=0.0)
                    x = x * w.to(tl.float32)[:, None]
                acc += x
            tl.store(
                DST + dst_rows * stride_dst + cols[None, :], acc.to(DST.dtype.element_ty), mask=mask
            )


# --------------------------------------------------------------------------------------------
# Launch helpers and autograd
# --------------------------------------------------------------------------------------------


def _tile(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): up to 1024 columns per step, 4096 elements per program."""
    block_n = min(1024, triton.next_power_of_2(max(n_cols, 1)))
    block_m = max(1, 4096 // block_n)
    return block_m, block_n, 8 if block_m * block_n >= 4096 else 4


def _unit_stride_rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _gather_rows(src, slots, top_k, *, out_dtype, weights=None, other=None):
    """Launch ``_gather_rows_kernel``: ``(dst, dot or None)``."""
    n_rows, n_cols = slots.numel(), src.shape[1]
    dst = torch.empty((n_rows, n_cols), dtype=out_dtype, device=src.device)
    dot = None
    if other is not None:
        dot = torch.zeros(n_rows, dtype=torch.float32, device=src.device)
    block_m, block_n, num_warps = _tile(n_cols)
    _gather_rows_kernel[(triton.cdiv(n_rows, block_m),)](
        src, dst, slots, weights if weights is not None else src,
        other if other is not None else src, dot if dot is not None else dst,
        src.stride(0), dst.stride(0), other.stride(0) if other is not None else 0,
        n_rows, n_cols,
        TOP_K=top_k, HAS_WEIGHTS=weights is not None, COMPUTE_DOT=other is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )  # fmt: skip
    return dst, dot


def _combine_rows(src, positions, *, out_dtype, weights=None):
    """Launch ``_combine_rows_kernel``: ``[tokens, cols]``."""
    n_tokens, top_k = positions.shape
    n_cols = src.shape[1]
    dst = torch.empty((n_tokens, n_cols), dtype=out_dtype, device=src.device)
    block_m, block_n, num_warps = _tile(n_cols)
    _combine_rows_kernel[(triton.cdiv(n_tokens, block_m),)](
        src, dst, positions, weights if weights is not None else src,
        src.stride(0), dst.stride(0),
        n_tokens, n_cols,
        TOP_K=top_k, HAS_WEIGHTS=weights is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )  # fmt: skip
    return dst


class _PermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, sorted_slots, slot_positions):
        top_k = slot_positions.shape[1]
        out, _ = _gather_rows(
            _unit_stride_rows(hidden), sorted_slots, top_k, out_dtype=hidden.dtype
        )
        KERNEL_LAUNCHES["moe_permute_fwd"] += 1
        ctx.save_for_backward(slot_positions)
        ctx.hidden_dtype = hidden.dtype
        return out

    @staticmethod
    def backward(ctx, d_sorted):
        (slot_positions,) = ctx.saved_tensors
        d_hidden = _combine_rows(
            _unit_stride_rows(d_sorted), slot_positions, out_dtype=ctx.hidden_dtype
        )
        KERNEL_LAUNCHES["moe_permute_bwd"] += 1
        return d_hidden, None, None


class _UnpermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_sorted, slot_positions, routing_weights):
        hidden_sorted = _unit_stride_rows(hidden_sorted)
        out = _combine_rows(
            hidden_sorted, slot_positions, out_dtype=hidden_sorted.dtype, weights=routing_weights
        )
        KERNEL_LAUNCHES["moe_unpermute_fwd"] += 1
        ctx.save_for_backward(hidden_sorted, slot_positions, routing_weights)
        return out

    @staticmethod
    def backward(ctx, d_out):
        hidden_sorted, slot_positions, routing_weights = ctx.saved_tensors
        top_k = slot_positions.shape[1]
        need_dw = routing_weights is not None and ctx.needs_input_grad[2]
        d_sorted, d_w = _gather_rows(
            _unit_stride_rows(d_out),
            _inverse(slot_positions),
            top_k,
            out_dtype=hidden_sorted.dtype,
            weights=routing_weights,
            other=hidden_sorted if need_dw else None,
        )
        KERNEL_LAUNCHES["moe_unpermute_bwd"] += 1
        d_w = d_w.view(slot_positions.shape).to(routing_weights.dtype) if need_dw else None
        return (d_sorted if ctx.needs_input_grad[0] else None), None, d_w


def _moe_permute_default(
    hidden: torch.Tensor, expert_indices: torch.Tensor, *, num_experts: int
) -> MoEPermutation:
    """The Triton gather where it can run, else :func:`moe_permute_reference`."""
    _check_permute_args(hidden, expert_indices, num_experts)
    if (
        hidden.numel() == 0
        or expert_indices.numel() == 0
        or hidden.dtype not in _KERNEL_DTYPES
        or not can_use_triton(hidden, expert_indices)
    ):
        return moe_permute_reference(hidden, expert_indices, num_experts=num_experts)
    sorted_slots, positions, counts, offsets = _routing_maps(expert_indices, num_experts)
    out = _PermuteFunction.apply(hidden, sorted_slots, positions)
    return MoEPermutation(out, sorted_slots, positions, counts, offsets)


def _moe_unpermute_default(
    hidden_sorted: torch.Tensor,
    slot_positions: torch.Tensor,
    *,
    routing_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Triton combine where it can run, else :func:`moe_unpermute_reference`."""
    _check_unpermute_args(hidden_sorted, slot_positions, routing_weights)
    tensors = [t for t in (hidden_sorted, slot_positions, routing_weights) if t is not None]
    if (
        hidden_sorted.numel() == 0
        or hidden_sorted.dtype not in _KERNEL_DTYPES
        or (routing_weights is not None and routing_weights.dtype not in _KERNEL_DTYPES)
        or not can_use_triton(*tensors)
    ):
        return moe_unpermute_reference(
            hidden_sorted, slot_positions, routing_weights=routing_weights
        )
    positions = slot_positions.to(torch.int64).contiguous()
    weights = None if routing_weights is None else routing_weights.contiguous()
    return _UnpermuteFunction.apply(hidden_sorted, positions, weights)


registry.define_op(
    "moe_permute",
    default=_moe_permute_default,
    reference=moe_permute_reference,
    doc="Copy each token once per chosen expert into rows sorted by expert (dropless MoE).",
)
registry.define_op(
    "moe_unpermute",
    default=_moe_unpermute_default,
    reference=moe_unpermute_reference,
    doc="Gather each token's top-k expert outputs and sum them weighted by the routing weights.",
)


def moe_permute(
    hidden: torch.Tensor, expert_indices: torch.Tensor, *, num_experts: int
) -> MoEPermutation:
    """Sort token rows by expert, one copy per chosen expert (dropless, MegaBlocks-style).

    Args:
        hidden: ``[tokens, hidden]`` token states (any float dtype; kernels for fp32/fp16/bf16).
        expert_indices: ``[tokens, top_k]`` integer expert ids in ``[0, num_experts)``
            (``MoERouting.indices``); ids are not range-checked (that would need a host sync).
        num_experts: number of experts (the length of the counts).

    Returns:
        :class:`MoEPermutation` ``(hidden, sorted_slots, slot_positions, tokens_per_expert,
        expert_offsets)``; ``hidden`` is ``[tokens * top_k, hidden]``, differentiable w.r.t. the
        input (its gradient sums each token's ``top_k`` row gradients). Rows of one expert keep
        token order.

    Dispatches through ``registry.get_op("moe_permute")``.
    """
    return registry.get_op("moe_permute")(hidden, expert_indices, num_experts=num_experts)


def moe_unpermute(
    hidden_sorted: torch.Tensor,
    slot_positions: torch.Tensor,
    *,
    routing_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scatter expert outputs back to their tokens and combine: ``out[t] = sum_j w[t,j] * y[pos[t,j]]``.

    Args:
        hidden_sorted: ``[tokens * top_k, hidden]`` expert outputs in the order of
            :func:`moe_permute`'s rows.
        slot_positions: ``[tokens, top_k]`` (``MoEPermutation.slot_positions``).
        routing_weights: ``[tokens, top_k]`` (``MoERouting.weights``), or ``None`` for a plain sum.

    Returns:
        ``[tokens, hidden]`` in ``hidden_sorted``'s dtype, summed in fp32; differentiable w.r.t.
        ``hidden_sorted`` and ``routing_weights``.

    Dispatches through ``registry.get_op("moe_unpermute")``.
    """
    return registry.get_op("moe_unpermute")(
        hidden_sorted, slot_positions, routing_weights=routing_weights
    )
