"""Ring attention: exact attention over a sequence sharded across the context-parallel ranks.

Liu, Zaharia and Abbeel 2023, "Ring Attention with Blockwise Transformers for Near-Infinite
Context" (arXiv:2310.01889). Each rank keeps its query shard; the key/value shards travel
around the ring (rank ``r`` sends to ``r + 1``), and at step ``i`` rank ``r`` attends to the
shard of rank ``r - i`` while the next one is in flight, merging the partial results with their
log-sum-exp (:mod:`~forge_parallel.context_parallel.blockwise`). Masks come from the *global*
positions of both shards, so causal attention, bidirectional attention, packed documents
(``cu_seqlens`` of the full sequence) and bidirectional blocks inside causal attention
(``block_ids`` of the full sequence: an image's tokens see each other, also the later ones on
another rank) are all exact under either sharding layout. No block is skipped by position:
each step computes its block pair's mask, and a pair (or a query row) with no visible key
contributes nothing to the merge.

Backward runs the ring again: K/V travel the same way, accompanied by the running sums of
their gradients, which each rank adds its block's ``dK``/``dV`` to; one last hop returns each
shard's finished ``dK``/``dV`` to its owner. ``dQ`` stays local.

Only the visible part of each block is computed, forward and backward: the queries that see
at least one of its keys and the keys seen by at least one query. Under the causal mask and
the zigzag layout that is half of every off-diagonal block (all queries against the earlier
key chunk, or the later query chunk against all keys), the same amount on every rank.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from forge_parallel.context_parallel.blockwise import (
    block_attention_backward,
    block_attention_forward,
    block_mask,
    merge_blocks,
)
from forge_parallel.context_parallel.sharding import (
    check_block_ids,
    document_ids,
    shard_positions,
)

__all__ = ["ring_attention"]


class _RingPass:
    """Post a send of ``x`` to the next rank and a receive from the previous one (async)."""

    def __init__(self, x: torch.Tensor, group: dist.ProcessGroup) -> None:
        size, me = dist.get_world_size(group), dist.get_rank(group)
        self.out = torch.empty_like(x, memory_format=torch.contiguous_format)
        nxt = dist.get_global_rank(group, (me + 1) % size)
        prev = dist.get_global_rank(group, (me - 1) % size)
        ops = [
            dist.P2POp(dist.isend, x.contiguous(), nxt, group),
            dist.P2POp(dist.irecv, self.out, prev, group),
        ]
        self.works = dist.batch_isend_irecv(ops)

    def wait(self) -> torch.Tensor:
        for work in self.works:
            work.wait()
        return self.out


class _Layout:
    """Global positions (documents, bidirectional blocks) of every rank's shard, for building
    block masks."""

    def __init__(
        self,
        local_len: int,
        cp_size: int,
        *,
        load_balance: bool,
        cu_seqlens: torch.Tensor | None,
        block_ids: torch.Tensor | None = None,
        device: torch.device,
    ) -> None:
        seq_len = local_len * cp_size
        self.positions = [
            shard_positions(seq_len, cp_size=cp_size, cp_rank=r, load_balance=load_balance).to(
                device
            )
            for r in range(cp_size)
        ]
        docs = None if cu_seqlens is None else document_ids(cu_seqlens, seq_len).to(device)
        self.documents = [None if docs is None else docs[p] for p in self.positions]
        blocks = None if block_ids is None else check_block_ids(block_ids, seq_len).to(device)
        self.blocks = [None if blocks is None else blocks[p] for p in self.positions]

    def mask(self, q_rank: int, k_rank: int, causal: bool) -> torch.Tensor | None:
        return block_mask(
            self.positions[q_rank],
            self.positions[k_rank],
            causal=causal,
            q_documents=self.documents[q_rank],
            k_documents=self.documents[k_rank],
            q_blocks=self.blocks[q_rank],
            k_blocks=self.blocks[k_rank],
        )


class _Part(NamedTuple):
    """The visible part of a block: query rows and key columns (``None``: all), and its mask."""

    rows: torch.Tensor | None
    cols: torch.Tensor | None
    mask: torch.Tensor | None


def _visible_part(mask: torch.Tensor | None) -> _Part | None:
    """``None`` when no query sees any key of the block."""
    if mask is None:
        return _Part(None, None, None)
    rows_seen, cols_seen = mask.any(1), mask.any(0)
    if not bool(rows_seen.any()):
        return None
    rows = None if bool(rows_seen.all()) else rows_seen.nonzero().squeeze(1)
    cols = None if bool(cols_seen.all()) else cols_seen.nonzero().squeeze(1)
    if rows is not None:
        mask = mask.index_select(0, rows)
    if cols is not None:
        mask = mask.index_select(1, cols)
    return _Part(rows, cols, None if bool(mask.all()) else mask)


def _take(x: torch.Tensor, index: torch.Tensor | None, dim: int) -> torch.Tensor:
    return x if index is None else x.index_select(dim, index)


def _add(total: torch.Tensor, index: torch.Tensor | None, dim: int, part: torch.Tensor) -> None:
    if index is None:
        total += part
    else:
        total.index_add_(dim, index, part)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale, layout):
        size, me = dist.get_world_size(group), dist.get_rank(group)
        out = q.new_zeros((*q.shape[:-1], v.shape[-1]), dtype=torch.float32)
        lse = q.new_full(q.shape[:-1], float("-inf"), dtype=torch.float32)
        dk = k.shape[-1]
        kv = torch.cat([k, v], dim=-1)  # one message per hop (v's head_dim may differ)
        for step in range(size):
            pending = _RingPass(kv, group) if step < size - 1 else None
            src = (me - step) % size
            part = _visible_part(layout.mask(me, src, causal))
            if part is not None:
                rows, cols = part.rows, part.cols
                block_kv = _take(kv, cols, 2)
                block_out, block_lse = block_attention_forward(
                    _take(q, rows, 2),
                    block_kv[..., :dk],
                    block_kv[..., dk:],
                    part.mask,
                    scale,
                )
                merged_out, merged_lse = merge_blocks(
                    _take(out, rows, 2), _take(lse, rows, 2), block_out, block_lse
                )
                if rows is None:
                    out, lse = merged_out, merged_lse
                else:
                    out = out.index_copy(2, rows, merged_out)
                    lse = lse.index_copy(2, rows, merged_lse)
            if pending is not None:
                kv = pending.wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.causal, ctx.scale, ctx.layout = group, causal, scale, layout
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        group, causal, scale, layout = ctx.group, ctx.causal, ctx.scale, ctx.layout
        size, me = dist.get_world_size(group), dist.get_rank(group)
        delta = (grad_out.float() * out.float()).sum(-1)
        grad_q = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk = k.shape[-1]
        kv = torch.cat([k, v], dim=-1)
        grad_kv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
        for step in range(size):
            pending = _RingPass(kv, group) if step < size - 1 else None
            src = (me - step) % size
            part = _visible_part(layout.mask(me, src, causal))
            if part is not None:
                rows, cols = part.rows, part.cols
                block_kv = _take(kv, cols, 2)
                grad_q_block, grad_k_block, grad_v_block = block_attention_backward(
                    _take(q, rows, 2),
                    block_kv[..., :dk],
                    block_kv[..., dk:],
                    _take(lse, rows, 2),
                    _take(grad_out, rows, 2),
                    _take(delta, rows, 2),
                    part.mask,
                    scale,
                )
                _add(grad_q, rows, 2, grad_q_block)
                _add(grad_kv, cols, 2, torch.cat([grad_k_block, grad_v_block], dim=-1))
            # The gradient sums travel with their K/V; the last hop takes them home.
            if size > 1:
                grad_kv = _RingPass(grad_kv, group).wait()
            if pending is not None:
                kv = pending.wait()
        return (
            grad_q.to(q.dtype),
            grad_kv[..., :dk].to(k.dtype),
            grad_kv[..., dk:].to(v.dtype),
            None,
            None,
            None,
            None,
        )


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup,
    causal: bool,
    scale: float,
    load_balance: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    block_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact attention of this rank's query shard over the whole sharded sequence.

    ``q``/``k`` (B, H or Hkv, S_local, D), ``v`` (B, Hkv, S_local, Dv): this rank's shard in the
    ``load_balance`` layout. Use :func:`~forge_parallel.context_parallel.context_parallel_attention`
    (which validates the arguments) rather than calling this directly.
    """
    layout = _Layout(
        q.shape[2],
        dist.get_world_size(group),
        load_balance=load_balance,
        cu_seqlens=cu_seqlens,
        block_ids=block_ids,
        device=q.device,
    )
    return _RingAttention.apply(q, k, v, group, causal, scale, layout)
