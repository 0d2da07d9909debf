"""``context_parallel_attention``: the one entry point model code calls (or the SDPA router
of :mod:`~forge_parallel.context_parallel.apply` calls for it)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from forge_core.collectives import GroupLike, as_process_group
from forge_parallel.context_parallel.config import CP_STYLES
from forge_parallel.context_parallel.ring_attention import ring_attention
from forge_parallel.context_parallel.ulysses import ulysses_attention
from forge_parallel.replay_checkpoint import recomputed_whole

__all__ = ["context_parallel_attention"]


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "context-parallel attention takes (batch, heads, seq, head_dim) tensors like "
            f"scaled_dot_product_attention, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must share batch "
            "and sequence shard length, q and k their head_dim, k and v their heads (v's "
            "head_dim may differ, as in multi-head latent attention)"
        )
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]}) "
            "for grouped-query attention"
        )


# Under torch.compile the exchanges (P2P ring steps, all-to-alls, data-dependent document
# masks) run eagerly, outside the graph: one clean graph break around the attention while the
# rest of a compiled block (projections, norms, MLP) stays in the graph, as torchtitan and
# torch.distributed.tensor.experimental.context_parallel do.
@torch.compiler.disable
def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: GroupLike,
    causal: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    block_ids: torch.Tensor | None = None,
    style: str = "ring",
    load_balance: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact attention over a sequence sharded across the context-parallel ``group``.

    ``q`` (B, H, S / cp, D), ``k`` (B, Hkv, S / cp, D) and ``v`` (B, Hkv, S / cp, Dv) are this
    rank's shard of the sequence in the ``load_balance`` layout (zigzag by default, see
    :func:`~forge_parallel.context_parallel.shard_sequence`); returns this rank's shard of the
    output, (B, H, S / cp, Dv). ``causal`` applies the causal mask on *global* positions;
    ``cu_seqlens`` (document boundaries of the full sequence, ``[0, ..., S]``) confines
    attention to each packed document. ``block_ids`` (``[S]`` or ``[1, S]``, the full sequence,
    ``-1`` outside any block): under ``causal``, tokens with the same non-negative id (one
    image's) attend to each other both ways, even across ranks, as
    ``forge_kernels.attention.AttentionMask(causal=True, segment_ids=..., block_ids=...)`` on one
    process. ``style``: ``"ring"`` or ``"ulysses"``. ``scale``
    defaults to ``1 / sqrt(D)``. Differentiable; the result equals full-sequence
    ``scaled_dot_product_attention`` on one process. Inside a block checkpointed with a
    selective policy it is one unit, recomputed whole with its exchanges
    (:func:`forge_parallel.replay_checkpoint.recomputed_whole`).
    """
    if style not in CP_STYLES:
        raise ValueError(
            f"unknown context-parallel style {style!r}; use one of {', '.join(CP_STYLES)}"
        )
    _check_shapes(q, k, v)
    pg = as_process_group(group)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if dist.get_world_size(pg) == 1 and cu_seqlens is None and block_ids is None:
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
        )
    implementation = ring_attention if style == "ring" else ulysses_attention
    # One unit for a selective recompute policy: never cached op by op, recomputed whole with
    # its exchanges, in the same order on every rank.
    with recomputed_whole():
        return implementation(
            q,
            k,
            v,
            group=pg,
            causal=causal,
            scale=scale,
            load_balance=load_balance,
            cu_seqlens=cu_seqlens,
            block_ids=block_ids,
        )
