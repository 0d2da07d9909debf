"""DeepSpeed-Ulysses: swap sequence sharding for head sharding around attention.

Jacobs et al. 2023, "DeepSpeed Ulysses: System Optimizations for Enabling Training of Extreme
Long Sequence Transformer Models" (arXiv:2309.14509). Before attention, an all-to-all over the
context-parallel group turns each rank's (B, H, S / cp, D) sequence shard into the full
sequence for ``H / cp`` heads; after it, the inverse all-to-all restores sequence sharding.
Attention in between is ordinary attention over the whole sequence (the gathered tokens are put
back in global order, so ``is_causal``, document masks and bidirectional blocks apply as on one
process, from the ids of the full sequence); the
all-to-alls are differentiable (their backward is the reverse exchange).

Query heads and key/value heads (grouped-query attention) must both be divisible by ``cp``:
the heads each rank holds, so under tensor parallelism ``tp x cp`` must divide the model's counts.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from forge_core.collectives import all_to_all
from forge_parallel.context_parallel.sharding import (
    check_block_ids,
    document_ids,
    gathered_positions,
)

__all__ = ["heads_to_sequence", "sequence_to_heads", "ulysses_attention", "validate_ulysses"]


def validate_ulysses(num_heads: int, num_kv_heads: int, cp: int, *, tp: int | None = None) -> None:
    """Raise a ``ValueError`` naming the valid degrees when the heads do not split over ``cp``.

    ``num_heads`` / ``num_kv_heads`` are the heads the attention call receives on this rank:
    under tensor parallelism the model's counts divided by the tensor-parallel degree ``tp``
    (given, the message names the model's counts; ``None``: not known here, as inside
    :func:`ulysses_attention`, which sees only the local tensors).
    """
    if num_heads % cp == 0 and num_kv_heads % cp == 0:
        return
    common = math.gcd(num_heads, num_kv_heads)
    valid = [d for d in range(1, common + 1) if common % d == 0]
    if tp is None:
        local = (
            " (the heads of this rank's attention call: under tensor parallelism, the model's "
            "counts divided by tp; tp x cp must divide the model's counts)"
        )
    elif tp > 1:
        local = (
            f" (local heads after tensor parallelism over tp={tp}: the model has "
            f"num_heads={num_heads * tp} and num_kv_heads={num_kv_heads * tp}, which "
            f"tp x cp = {tp * cp} must divide; or lower tp)"
        )
    else:
        local = ""
    raise ValueError(
        f"Ulysses context parallelism splits attention heads over cp={cp} ranks, but "
        f"num_heads={num_heads} and num_kv_heads={num_kv_heads} are not both divisible by "
        f"{cp}{local}; use cp in {valid} or style='ring' (any head count)"
    )


def sequence_to_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(B, H, S / cp, D) sequence shard -> (B, H / cp, S, D), tokens in rank order."""
    cp = dist.get_world_size(group)
    b, h, s, d = x.shape
    chunks = x.reshape(b, cp, h // cp, s, d).transpose(0, 1)  # (cp: head group, B, H/cp, S/cp, D)
    received = all_to_all(chunks.contiguous(), group=group)  # (cp: source rank, ...)
    return received.permute(1, 2, 0, 3, 4).reshape(b, h // cp, cp * s, d)


def heads_to_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(B, H / cp, S, D), tokens in rank order -> (B, H, S / cp, D) sequence shard."""
    cp = dist.get_world_size(group)
    b, hl, s, d = x.shape
    chunks = x.reshape(b, hl, cp, s // cp, d).permute(2, 0, 1, 3, 4)  # (cp: dest rank, ...)
    received = all_to_all(chunks.contiguous(), group=group)  # (cp: head group, B, H/cp, S/cp, D)
    return received.transpose(0, 1).reshape(b, cp * hl, s // cp, d)


def _full_mask(
    seq_len: int,
    causal: bool,
    cu_seqlens: torch.Tensor | None,
    block_ids: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Dense (S, S) mask of the whole sequence, ``None`` when ``is_causal`` (or nothing) says it
    all: same document and (``k <= q`` or same block ``>= 0``) under ``causal``."""
    blocks = None if block_ids is None else check_block_ids(block_ids, seq_len).to(device)
    if cu_seqlens is None and (blocks is None or not causal):
        return None
    mask = None
    if causal:
        mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
        if blocks is not None:
            mask = mask | ((blocks[:, None] == blocks[None, :]) & (blocks[:, None] >= 0))
    if cu_seqlens is not None:
        docs = document_ids(cu_seqlens, seq_len).to(device)
        same = docs[:, None] == docs[None, :]
        mask = same if mask is None else mask & same
    return mask


def ulysses_attention(
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
    """Exact attention of this rank's sequence shard via head-sharded full-sequence attention.

    Shapes and layout as :func:`~forge_parallel.context_parallel.ring_attention`.
    """
    cp = dist.get_world_size(group)
    validate_ulysses(q.shape[1], k.shape[1], cp)
    seq_len = q.shape[2] * cp
    order = gathered_positions(seq_len, cp_size=cp, load_balance=load_balance).to(q.device)
    to_global = torch.argsort(order)
    q_h, k_h, v_h = (sequence_to_heads(t, group).index_select(2, to_global) for t in (q, k, v))
    mask = _full_mask(seq_len, causal, cu_seqlens, block_ids, q.device)
    out = F.scaled_dot_product_attention(
        q_h,
        k_h,
        v_h,
        attn_mask=mask,
        is_causal=causal and mask is None,
        scale=scale,
        enable_gqa=k_h.shape[1] != q_h.shape[1],
    )
    return heads_to_sequence(out.index_select(2, order), group)
