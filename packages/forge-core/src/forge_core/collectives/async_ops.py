"""Collectives that return a handle, to overlap communication with computation.

Start the communication, do independent work, then ``wait()`` for the result::

    pending = all_gather_async(next_layer_weight, group=mesh["dp_shard"])
    y = layer(x)                      # runs while the gather is in flight
    w = pending.wait()

:func:`overlapped` applies this to a sequence of chunks (software pipelining): the
communication of chunk ``i + 1`` is in flight while chunk ``i`` is computed, the pattern behind
FSDP's parameter prefetch and chunked MoE all-to-all. These handles are not differentiable;
build autograd functions from them where the backward needs overlap too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

from forge_core.collectives.differentiable import (
    check_gather_shapes,
    check_sizes,
    exchange_split_sizes,
    pad_dim0,
    reduce_op_by_name,
    shape_checks_enabled,
    unpad_gathered,
)
from forge_core.collectives.groups import GroupLike, as_process_group

__all__ = [
    "PendingCollective",
    "all_gather_async",
    "all_reduce_async",
    "all_to_all_async",
    "overlapped",
    "reduce_scatter_async",
]

T = TypeVar("T")
R = TypeVar("R")


class PendingCollective:
    """A collective in flight. :meth:`wait` blocks (or orders the device stream) and returns the result."""

    def __init__(
        self,
        work: dist.Work | None,
        buffer: torch.Tensor,
        finish: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    ) -> None:
        self._work = work
        self._buffer = buffer
        self._finish = finish
        self._result: torch.Tensor | None = None

    def is_completed(self) -> bool:
        return self._work is None or self._work.is_completed()

    def wait(self) -> torch.Tensor:
        if self._result is None:
            if self._work is not None:
                self._work.wait()
            self._result = self._finish(self._buffer)
            self._work = None
        return self._result


def all_gather_async(
    x: torch.Tensor,
    *,
    dim: int = 0,
    group: GroupLike = None,
    sizes: Sequence[int] | None = None,
    check_shapes: bool | None = None,
) -> PendingCollective:
    """Start concatenating every rank's ``x`` along ``dim``.

    Equal shapes on every rank unless ``sizes`` gives each rank's length along ``dim``; a
    mismatch is not detected unless ``check_shapes`` (see
    :func:`forge_core.collectives.all_gather`, whose rules these are).
    """
    pg = as_process_group(group)
    dim = dim % x.dim()
    if sizes is not None:
        sizes = check_sizes(x, dim, sizes, pg)
    if shape_checks_enabled(check_shapes):
        check_gather_shapes(x, dim, sizes, pg, "all_gather_async")
    moved = x.movedim(dim, 0)
    moved = moved.contiguous() if sizes is None else pad_dim0(moved, max(sizes))
    out = moved.new_empty((moved.shape[0] * dist.get_world_size(pg), *moved.shape[1:]))
    work = dist.all_gather_into_tensor(out, moved, group=pg, async_op=True)
    if sizes is None:
        return PendingCollective(work, out, lambda t: t.movedim(0, dim))
    return PendingCollective(work, out, lambda t: unpad_gathered(t, sizes).movedim(0, dim))


def reduce_scatter_async(
    x: torch.Tensor, *, dim: int = 0, op: str = "sum", group: GroupLike = None
) -> PendingCollective:
    """Start reducing ``x`` over ranks and keeping this rank's slice of ``dim``."""
    pg = as_process_group(group)
    size = dist.get_world_size(pg)
    dim = dim % x.dim()
    if x.shape[dim] % size != 0:
        raise ValueError(
            f"dim {dim} of size {x.shape[dim]} is not divisible by the group size {size}"
        )
    moved = x.movedim(dim, 0).contiguous()
    out = moved.new_empty((moved.shape[0] // size, *moved.shape[1:]))
    reduce_op = reduce_op_by_name(op)
    divide = reduce_op == dist.ReduceOp.AVG and dist.get_backend(pg) == "gloo"
    if divide:
        reduce_op = dist.ReduceOp.SUM
    work = dist.reduce_scatter_tensor(out, moved, op=reduce_op, group=pg, async_op=True)
    return PendingCollective(work, out, lambda t: (t.div_(size) if divide else t).movedim(0, dim))


def all_reduce_async(
    x: torch.Tensor, *, op: str = "sum", group: GroupLike = None
) -> PendingCollective:
    """Start an out-of-place all-reduce of ``x``."""
    pg = as_process_group(group)
    out = x.clone(memory_format=torch.contiguous_format)
    work = dist.all_reduce(out, op=reduce_op_by_name(op), group=pg, async_op=True)
    return PendingCollective(work, out)


def all_to_all_async(
    x: torch.Tensor,
    *,
    input_split_sizes: Sequence[int] | None = None,
    output_split_sizes: Sequence[int] | None = None,
    group: GroupLike = None,
) -> PendingCollective:
    """Start an all-to-all along dim 0 (see :func:`forge_core.collectives.all_to_all`)."""
    pg = as_process_group(group)
    if input_split_sizes is not None and output_split_sizes is None:
        output_split_sizes = exchange_split_sizes(input_split_sizes, pg)
    rows = x.shape[0] if output_split_sizes is None else sum(output_split_sizes)
    out = x.new_empty((rows, *x.shape[1:]))
    work = dist.all_to_all_single(
        out,
        x.contiguous(),
        output_split_sizes=None if output_split_sizes is None else list(output_split_sizes),
        input_split_sizes=None if input_split_sizes is None else list(input_split_sizes),
        group=pg,
        async_op=True,
    )
    return PendingCollective(work, out)


def overlapped(
    items: Sequence[T],
    *,
    communicate: Callable[[T], PendingCollective],
    compute: Callable[[T, torch.Tensor], R],
) -> list[R]:
    """``[compute(item, communicate(item).wait()) for item in items]``, with the communication
    of the next item started before the current item is computed."""
    results: list[R] = []
    pending = communicate(items[0]) if items else None
    for i, item in enumerate(items):
        upcoming = communicate(items[i + 1]) if i + 1 < len(items) else None
        results.append(compute(item, pending.wait()))
        pending = upcoming
    return results
