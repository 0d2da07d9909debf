"""Sharding a sequence over the context-parallel ranks, and putting it back together.

Two layouts of a sequence of ``S`` tokens over ``cp`` ranks:

- contiguous (``load_balance=False``): rank ``r`` holds positions ``[r * S / cp, (r + 1) * S / cp)``;
- zigzag (``load_balance=True``): the sequence is cut into ``2 * cp`` chunks and rank ``r``
  holds chunks ``r`` and ``2 * cp - 1 - r``. Under a causal mask the first chunk of a rank
  attends to few keys and its second to many, so every rank does the same work (Megatron-Core
  context parallelism; Llama 3 paper, Dubey et al. 2024, section 3.3.2).

Everything here is pure index arithmetic on ``(cp_size, cp_rank)`` except
:func:`unshard_sequence`, which all-gathers over the group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from forge_core.collectives import GroupLike, all_gather, as_process_group

__all__ = [
    "check_block_ids",
    "document_ids",
    "gathered_positions",
    "shard_positions",
    "shard_sequence",
    "unshard_sequence",
]


def _check_layout(seq_len: int, cp_size: int, cp_rank: int, load_balance: bool) -> int:
    """Validate and return the number of chunks the sequence is cut into."""
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} is outside [0, {cp_size})")
    chunks = 2 * cp_size if load_balance else cp_size
    if seq_len % chunks != 0:
        layout = "zigzag (load_balance=True)" if load_balance else "contiguous"
        raise ValueError(
            f"sequence length {seq_len} must be divisible by {chunks} for the {layout} "
            f"layout over cp={cp_size} ranks; pad it to {-(-seq_len // chunks) * chunks}"
        )
    return chunks


def shard_positions(
    seq_len: int, *, cp_size: int, cp_rank: int, load_balance: bool = True
) -> torch.Tensor:
    """The global positions (int64, increasing) of the tokens rank ``cp_rank`` holds."""
    chunks = _check_layout(seq_len, cp_size, cp_rank, load_balance)
    size = seq_len // chunks
    if not load_balance:
        return torch.arange(cp_rank * size, (cp_rank + 1) * size)
    second = chunks - 1 - cp_rank
    return torch.cat(
        [
            torch.arange(cp_rank * size, (cp_rank + 1) * size),
            torch.arange(second * size, (second + 1) * size),
        ]
    )


def gathered_positions(seq_len: int, *, cp_size: int, load_balance: bool = True) -> torch.Tensor:
    """Global positions of the rank-ordered concatenation of every rank's shard."""
    return torch.cat(
        [
            shard_positions(seq_len, cp_size=cp_size, cp_rank=r, load_balance=load_balance)
            for r in range(cp_size)
        ]
    )


def shard_sequence(
    x: torch.Tensor, *, dim: int, cp_size: int, cp_rank: int, load_balance: bool = True
) -> torch.Tensor:
    """Rank ``cp_rank``'s shard of ``x`` along its sequence dimension ``dim``.

    Use it for input ids, labels, position ids (``shard_sequence(torch.arange(S)[None], dim=1,
    ...)``), anything indexed by token.
    """
    dim = dim % x.dim()
    index = shard_positions(
        x.shape[dim], cp_size=cp_size, cp_rank=cp_rank, load_balance=load_balance
    ).to(x.device)
    return x.index_select(dim, index)


def unshard_sequence(
    x: torch.Tensor, *, dim: int, group: GroupLike, load_balance: bool = True
) -> torch.Tensor:
    """The full sequence from every rank's shard (all-gather, then undo the layout).

    Differentiable: the backward gives each rank the gradient of its own shard.
    """
    pg = as_process_group(group)
    cp_size = dist.get_world_size(pg)
    dim = dim % x.dim()
    gathered = all_gather(x, dim=dim, group=pg)
    order = gathered_positions(gathered.shape[dim], cp_size=cp_size, load_balance=load_balance)
    return gathered.index_select(dim, torch.argsort(order).to(x.device))


def document_ids(cu_seqlens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Document index of every position of a packed sequence of ``seq_len`` tokens.

    ``cu_seqlens`` are the cumulative document boundaries of the *full* (unsharded) sequence,
    ``[0, len_0, len_0 + len_1, ..., seq_len]`` as in FlashAttention's varlen interface.
    """
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
        raise ValueError(
            "cu_seqlens must be a 1-D integer tensor of document boundaries [0, ..., seq_len], "
            f"got {type(cu_seqlens).__name__}"
            + (
                f" of shape {tuple(cu_seqlens.shape)}"
                if isinstance(cu_seqlens, torch.Tensor)
                else ""
            )
        )
    if cu_seqlens.is_floating_point() or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must hold at least 2 integer boundaries, got {cu_seqlens.tolist()}"
        )
    bounds = cu_seqlens.to("cpu", torch.int64)
    if bounds[0] != 0 or bounds[-1] != seq_len:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at the full sequence length {seq_len} (all "
            f"ranks' tokens together), got {bounds[0].item()} ... {bounds[-1].item()}"
        )
    if bool((bounds[1:] < bounds[:-1]).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds.tolist()}")
    positions = torch.arange(seq_len)
    return torch.searchsorted(bounds[1:], positions, right=True).to(cu_seqlens.device)


def check_block_ids(block_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``block_ids`` of the *full* (unsharded) sequence of ``seq_len`` tokens as a 1-D int64
    tensor, after checking them: tokens with the same non-negative id (one image, video or
    action chunk) attend to each other both ways under a causal mask, ``-1`` marks ordinary
    tokens (``forge_kernels.attention.AttentionMask``'s ``block_ids``). ``[S]`` or ``[1, S]``;
    every row of a batch shares them, as it shares ``cu_seqlens``.
    """
    if not isinstance(block_ids, torch.Tensor):
        raise ValueError(
            f"block_ids must be an integer tensor of the full sequence's {seq_len} tokens, got "
            f"{type(block_ids).__name__}"
        )
    if block_ids.is_floating_point() or block_ids.dtype == torch.bool:
        raise ValueError(f"block_ids must be an integer tensor, got {block_ids.dtype}")
    if block_ids.dim() == 2 and block_ids.shape[0] == 1:
        block_ids = block_ids[0]
    if block_ids.dim() != 1 or block_ids.shape[0] != seq_len:
        raise ValueError(
            f"block_ids must cover the full sequence, [{seq_len}] or [1, {seq_len}] (all ranks' "
            f"tokens together, in sequence order; one set for every row of the batch), got "
            f"shape {tuple(block_ids.shape)}"
        )
    return block_ids.to(torch.int64)
