"""Chunked dispatch -> experts -> combine, with the all-to-alls overlapping expert compute.

Every expert's rows are split into ``num_chunks`` near-equal parts; chunk ``c`` holds part ``c``
of every expert, so each chunk is itself grouped by expert and dispatched like a whole batch
(:mod:`~forge_parallel.expert_parallel.dispatch`). The forward is software-pipelined
(:func:`forge_core.collectives.overlapped`'s pattern): the dispatch of chunk ``c + 1`` is in
flight while the experts compute chunk ``c``, and the combine of chunk ``c`` while they
compute chunk ``c + 1`` (Megatron-Core's ``--moe-a2a-overlap`` idea in its simplest form).

The backward overlaps too. Each exchange is two autograd nodes, a launch and a collect joined
by an empty token; in backward their roles swap: the collect node *starts* the reverse
exchange of the gradient and the launch node *waits* for it. Autograd runs ready nodes
latest-created first, so the reverse combines of every chunk start as soon as the output's
gradient arrives, chunk ``c``'s expert backward runs while the reverse combines of the earlier
chunks are in flight, and the reverse dispatch of chunk ``c + 1`` is in flight while the expert
backward of chunk ``c`` runs. Every rank builds the same graph, so every rank starts the
exchanges in the same order. Row results do not depend on the chunking (every row meets the
same expert weights), so outputs and gradients equal the unchunked ones.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from forge_core.collectives import PendingCollective, all_to_all_async
from forge_parallel.expert_parallel.dispatch import (
    DispatchPlan,
    check_tokens_per_expert,
    exchange_counts,
    plan_from_counts,
)

__all__ = ["chunked_expert_forward"]

Compute = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _Handle:
    """Carries a pending all-to-all from launch to collection, and the reverse exchange of its
    gradient from collection back to launch."""

    def __init__(self, input_splits: list[int], output_splits: list[int], group) -> None:
        self.input_splits, self.output_splits, self.group = input_splits, output_splits, group
        self.pending: PendingCollective | None = None
        self.pending_grad: PendingCollective | None = None


class _Launch(torch.autograd.Function):
    """Start an all-to-all of ``x``; returns an empty token that orders :class:`_Collect` after.
    Backward: wait for the reverse exchange :class:`_Collect` started."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, handle: _Handle) -> torch.Tensor:
        ctx.handle = handle
        handle.pending = all_to_all_async(
            x,
            input_split_sizes=handle.input_splits,
            output_split_sizes=handle.output_splits,
            group=handle.group,
        )
        return x.new_empty(0)

    @staticmethod
    def backward(ctx, _token_grad: torch.Tensor):
        handle = ctx.handle
        pending, handle.pending_grad = handle.pending_grad, None
        return pending.wait(), None


class _Collect(torch.autograd.Function):
    """Wait for the all-to-all started by :class:`_Launch` and return its result. Backward:
    start the reverse exchange of the gradient (:class:`_Launch` waits for it)."""

    @staticmethod
    def forward(ctx, _token: torch.Tensor, handle: _Handle) -> torch.Tensor:
        ctx.handle = handle
        result = handle.pending.wait()
        handle.pending = None
        return result

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        handle = ctx.handle
        handle.pending_grad = all_to_all_async(
            grad.contiguous(),
            input_split_sizes=handle.output_splits,
            output_split_sizes=handle.input_splits,
            group=handle.group,
        )
        return grad.new_empty(0), None


def _launch(x: torch.Tensor, input_splits, output_splits, group) -> tuple[torch.Tensor, _Handle]:
    handle = _Handle(list(input_splits), list(output_splits), group)
    return _Launch.apply(x, handle), handle


def _chunk_rows(counts: torch.Tensor, num_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, chunk_counts ``[C, E]``): ``x[order]`` is chunk-major, expert-sorted in each chunk."""
    experts = counts.numel()
    expert_of_row = torch.repeat_interleave(torch.arange(experts), counts)
    offsets = torch.cumsum(counts, 0) - counts
    position = torch.arange(expert_of_row.numel()) - offsets[expert_of_row]
    chunk = position * num_chunks // counts[expert_of_row].clamp_min(1)
    order = torch.argsort(chunk, stable=True)
    chunk_counts = torch.bincount(chunk * experts + expert_of_row, minlength=num_chunks * experts)
    return order, chunk_counts.view(num_chunks, experts)


def chunked_expert_forward(
    x_sorted: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    compute: Compute,
    *,
    group: dist.ProcessGroup,
    num_chunks: int,
) -> torch.Tensor:
    """``combine(compute(dispatch(x)))`` over ``num_chunks`` pipelined chunks.

    ``compute(x_local, local_tokens_per_expert)`` runs this rank's experts on rows grouped by
    local expert. Returns the expert output of every row of ``x_sorted``, in its order.
    """
    size = dist.get_world_size(group)
    counts = check_tokens_per_expert(tokens_per_expert, x_sorted.shape[0], size)
    order, chunk_counts = _chunk_rows(counts, num_chunks)
    local = counts.numel() // size
    send = chunk_counts.view(num_chunks, size, local)
    # One exchange of every chunk's counts: [ep, C, L] out, [ep (source), C, L] in.
    recv = exchange_counts(send.transpose(0, 1), group).cpu().transpose(0, 1)
    device = x_sorted.device
    plans: list[DispatchPlan] = [
        plan_from_counts(send[c], recv[c], group, device=device) for c in range(num_chunks)
    ]
    rows = chunk_counts.sum(dim=1).tolist()
    order = order.to(device)
    pieces = x_sorted.index_select(0, order).split(rows)

    def start_dispatch(c: int):
        return _launch(pieces[c], plans[c].send_splits, plans[c].recv_splits, group)

    outputs: list[tuple[torch.Tensor, _Handle]] = []
    inflight = start_dispatch(0)
    for c in range(num_chunks):
        upcoming = start_dispatch(c + 1) if c + 1 < num_chunks else None
        received = _Collect.apply(*inflight)
        y_local = compute(
            received.index_select(0, plans[c].order), plans[c].local_tokens_per_expert
        )
        y_received = y_local.index_select(0, plans[c].inverse)
        outputs.append(_launch(y_received, plans[c].recv_splits, plans[c].send_splits, group))
        inflight = upcoming
    combined = torch.cat([_Collect.apply(token, handle) for token, handle in outputs])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=device)
    return combined.index_select(0, inverse)
