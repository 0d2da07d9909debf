"""Dropless token dispatch and combine for expert parallelism (variable all-to-all).

The experts of a MoE layer are split over the ``ep`` ranks of an expert-parallel group: rank
``j`` owns the ``L = E / ep`` experts ``j * L .. (j + 1) * L - 1``. Every rank routes and
permutes its own tokens (rows grouped by expert, in expert order: ``moe_permute``), so the
rows bound for rank ``j`` are one contiguous slice of the permuted buffer and
``tokens_per_expert`` gives the all-to-all split sizes. Nothing is dropped or padded: the
split sizes vary per step (GShard, Lepikhin et al. 2020, arXiv:2006.16668, without its
capacity factor; Megatron-Core's ``MoEAlltoAllTokenDispatcher``).

One dispatch:

1. the per-(destination, local expert) counts are exchanged (one small all-to-all), so each
   rank knows ``recv_counts[source, local_expert]``;
2. the rows are exchanged with the exact-gradient :func:`forge_core.collectives.all_to_all`;
   they arrive grouped by source rank, then by local expert;
3. they are regrouped by local expert (then by source), the order a grouped GEMM needs.

:func:`combine` runs steps 3 and 2 backwards, so row ``r`` of the combined output is the expert
output of row ``r`` of the dispatched input, as if all experts were local. Both directions are
differentiable (``index_select`` and all-to-all, whose adjoint is the reverse exchange).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from forge_core.collectives import GroupLike, all_to_all, as_process_group

__all__ = [
    "DispatchPlan",
    "check_tokens_per_expert",
    "combine",
    "dispatch",
    "exchange_counts",
    "plan_dispatch",
    "plan_from_counts",
]


@dataclass(frozen=True)
class DispatchPlan:
    """How one batch of permuted rows moves to the experts' owners and back.

    Attributes:
        group: the expert-parallel process group.
        send_splits: rows this rank sends to each ep rank.
        recv_splits: rows this rank receives from each ep rank.
        local_tokens_per_expert: int64 ``[L]`` rows per local expert after the dispatch (the
            grouped GEMM's group sizes).
        order: int64 index: ``dispatched = received[order]`` (source-major -> expert-major).
        inverse: the inverse permutation of ``order``.
    """

    group: dist.ProcessGroup
    send_splits: list[int]
    recv_splits: list[int]
    local_tokens_per_expert: torch.Tensor
    order: torch.Tensor
    inverse: torch.Tensor


def exchange_counts(send_counts: torch.Tensor, group: GroupLike) -> torch.Tensor:
    """``send_counts[j, ...]``: counts for ep rank ``j``; returns ``recv[i, ...]`` from rank ``i``.

    One all-to-all of a small int64 tensor (on the CPU for gloo, on the device otherwise).
    """
    pg = as_process_group(group)
    size = dist.get_world_size(pg)
    if send_counts.shape[0] != size:
        raise ValueError(
            f"send_counts has {send_counts.shape[0]} rows but the ep group has {size} ranks"
        )
    device = send_counts.device if dist.get_backend(pg) != "gloo" else torch.device("cpu")
    send = send_counts.to(device=device, dtype=torch.int64).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=pg)
    return recv


def plan_from_counts(
    send_counts: torch.Tensor,
    recv_counts: torch.Tensor,
    group: GroupLike,
    device: torch.device | str | None = None,
) -> DispatchPlan:
    """A :class:`DispatchPlan` from already exchanged ``[ep, L]`` counts (no communication)."""
    pg = as_process_group(group)
    size, local = recv_counts.shape
    recv_flat = recv_counts.reshape(-1).to("cpu", torch.int64)
    # Received rows are grouped by (source, local expert); segment s * L + l has recv[s, l] rows.
    segment = torch.repeat_interleave(torch.arange(size * local), recv_flat)
    key = (segment % local) * size + segment // local
    order = torch.argsort(key, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    device = torch.device("cpu") if device is None else torch.device(device)
    return DispatchPlan(
        group=pg,
        send_splits=send_counts.sum(dim=1).tolist(),
        recv_splits=recv_counts.sum(dim=1).tolist(),
        local_tokens_per_expert=recv_counts.sum(dim=0).to(device, torch.int64),
        order=order.to(device),
        inverse=inverse.to(device),
    )


def check_tokens_per_expert(tokens_per_expert: torch.Tensor, rows: int, size: int) -> torch.Tensor:
    """``tokens_per_expert`` as CPU int64, checked against ``rows`` and the ep size ``size``."""
    if tokens_per_expert.dim() != 1:
        raise ValueError(
            f"tokens_per_expert must be 1-D [num_experts], got shape {tuple(tokens_per_expert.shape)}"
        )
    experts = tokens_per_expert.numel()
    if experts % size != 0:
        raise ValueError(
            f"{experts} experts cannot be split over ep={size} ranks; ep must divide the number "
            "of experts"
        )
    counts = tokens_per_expert.to("cpu", torch.int64)
    total = int(counts.sum())
    if total != rows:
        raise ValueError(
            f"tokens_per_expert sums to {total} but there are {rows} rows; pass the counts of "
            "moe_permute's output"
        )
    return counts


def plan_dispatch(
    tokens_per_expert: torch.Tensor, rows: int, group: GroupLike, device=None
) -> DispatchPlan:
    """Plan the dispatch of ``rows`` permuted rows with global ``tokens_per_expert`` ``[E]``."""
    pg = as_process_group(group)
    size = dist.get_world_size(pg)
    counts = check_tokens_per_expert(tokens_per_expert, rows, size).view(size, -1)
    recv = exchange_counts(counts, pg)
    return plan_from_counts(counts, recv.cpu(), pg, device=device)


def dispatch(x_sorted: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Send each row to its expert's owner; returns this rank's rows grouped by local expert."""
    received = all_to_all(
        x_sorted,
        input_split_sizes=plan.send_splits,
        output_split_sizes=plan.recv_splits,
        group=plan.group,
    )
    return received.index_select(0, plan.order)


def combine(y_local: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Send expert outputs back to where their rows came from (the inverse of :func:`dispatch`)."""
    received_order = y_local.index_select(0, plan.inverse)
    return all_to_all(
        received_order,
        input_split_sizes=plan.recv_splits,
        output_split_sizes=plan.send_splits,
        group=plan.group,
    )
