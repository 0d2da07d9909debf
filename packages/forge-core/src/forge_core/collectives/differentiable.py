"""Collectives with exact gradients, for any process group or mesh axis.

Semantics: every rank holds its own input ``x_r``; the job's objective is the sum of the
ranks' local losses ``L = sum_r L_r``. Each op's backward returns ``dL/dx_r`` on rank ``r``, i.e.
the gradient a single process would get by running the whole computation on the concatenated
inputs. The adjoint pairs are:

=====================  ==========================
forward                backward
=====================  ==========================
all-gather             reduce-scatter (sum)
reduce-scatter (sum)   all-gather
all-reduce (sum/avg)   all-reduce (sum/avg)
all-to-all (splits)    all-to-all (splits swapped)
send to ``dst``        receive the gradient from ``dst``
shift by ``k``         shift by ``-k``
=====================  ==========================

For tensors that are *replicated* across the group (tensor parallelism), use the conjugate
``f``/``g`` operators of :mod:`forge_core.collectives.regions` instead.

Shapes: the backends trust every rank to pass the shape its peers expect and do not check it.
A mismatch (an all-gather of ``(3, 2)`` on one rank and ``(2, 2)`` on another) gives garbage on
one rank and an abort or a hang on another. Uneven all-gathers take ``sizes=``; to find a
mismatch, pass ``check_shapes=True`` or set ``FORGE_CHECK_COLLECTIVES=1``: every rank then
exchanges its shape first (two small extra collectives per call, off by default) and all raise
the same ``ValueError`` naming every rank's shape.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

from forge_core.collectives.groups import GroupLike, as_process_group, global_rank

__all__ = ["all_gather", "all_reduce", "all_to_all", "recv", "reduce_scatter", "send", "shift"]

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.AVG}
#: Set to ``1`` to check the shapes of every all-gather across ranks (see the module docstring).
CHECK_ENV_VAR = "FORGE_CHECK_COLLECTIVES"


def shape_checks_enabled(check_shapes: bool | None) -> bool:
    """``check_shapes`` if given, else whether ``FORGE_CHECK_COLLECTIVES`` is set (not ``0``)."""
    if check_shapes is not None:
        return check_shapes
    return os.environ.get(CHECK_ENV_VAR, "") not in ("", "0")


def gather_shapes(x: torch.Tensor, group: dist.ProcessGroup) -> list[tuple[int, ...]]:
    """Every rank's ``x.shape``, in group rank order (two small all-gathers)."""
    size = dist.get_world_size(group)
    ndims = torch.empty(size, dtype=torch.int64, device=x.device)
    mine = torch.tensor([x.dim()], dtype=torch.int64, device=x.device)
    dist.all_gather_into_tensor(ndims, mine, group=group)
    width = max(int(ndims.max()), 1)
    dims = torch.tensor([*x.shape] + [-1] * (width - x.dim()), dtype=torch.int64, device=x.device)
    everyone = torch.empty(size * width, dtype=torch.int64, device=x.device)
    dist.all_gather_into_tensor(everyone, dims, group=group)
    rows = everyone.view(size, width).tolist()
    return [tuple(row[:n]) for row, n in zip(rows, ndims.tolist(), strict=True)]


def check_gather_shapes(
    x: torch.Tensor, dim: int, sizes: Sequence[int] | None, group: dist.ProcessGroup, what: str
) -> None:
    """Raise the same ``ValueError`` on every rank if the ranks' shapes cannot be gathered."""
    shapes = gather_shapes(x, group)
    if sizes is None:
        ok = all(s == shapes[0] for s in shapes)
        need = "equal shapes on every rank (pass sizes=[...] to gather uneven lengths)"
    else:
        rest = [s[:dim] + s[dim + 1 :] if len(s) > dim else s for s in shapes]
        ok = all(len(s) == x.dim() for s in shapes) and all(r == rest[0] for r in rest)
        ok = ok and all(s[dim] == n for s, n in zip(shapes, sizes, strict=True))
        need = f"shapes equal except along dim {dim}, whose lengths must be sizes={list(sizes)}"
    if not ok:
        listing = ", ".join(f"rank {r}: {tuple(s)}" for r, s in enumerate(shapes))
        raise ValueError(f"{what} along dim {dim} got {listing}; it needs {need}")


def check_sizes(x: torch.Tensor, dim: int, sizes: Sequence[int], group) -> list[int]:
    """Validate an uneven all-gather's ``sizes`` locally (no communication)."""
    sizes = [int(n) for n in sizes]
    world = dist.get_world_size(group)
    if len(sizes) != world or any(n < 0 for n in sizes):
        raise ValueError(f"sizes must hold one non-negative length per rank ({world}), got {sizes}")
    me = dist.get_rank(group)
    if sizes[me] != x.shape[dim]:
        raise ValueError(
            f"sizes[{me}]={sizes[me]} but this rank's input has length {x.shape[dim]} along "
            f"dim {dim} (shape {tuple(x.shape)})"
        )
    return sizes


def pad_dim0(x: torch.Tensor, length: int) -> torch.Tensor:
    """``x`` zero-padded along dim 0 to ``length`` rows, contiguous."""
    if x.shape[0] == length:
        return x.contiguous()
    return torch.cat([x, x.new_zeros((length - x.shape[0], *x.shape[1:]))])


def unpad_gathered(full: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Undo :func:`pad_dim0` on an all-gather of padded blocks (dim 0)."""
    longest = max(sizes)
    return torch.cat([full[r * longest : r * longest + n] for r, n in enumerate(sizes)])


def reduce_op_by_name(op: str) -> dist.ReduceOp:
    try:
        return _REDUCE_OPS[op]
    except KeyError:
        raise ValueError(f"differentiable reductions are 'sum' or 'avg', got {op!r}") from None


def _gather_dim0(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    size = dist.get_world_size(group)
    out = x.new_empty((x.shape[0] * size, *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _reduce_scatter_dim0(
    x: torch.Tensor, group: dist.ProcessGroup, op: dist.ReduceOp
) -> torch.Tensor:
    size = dist.get_world_size(group)
    if x.shape[0] % size != 0:
        raise ValueError(
            f"reduce-scatter splits dim of size {x.shape[0]} into {size} equal parts; "
            f"it must be divisible by the group size {size}"
        )
    out = x.new_empty((x.shape[0] // size, *x.shape[1:]))
    if op == dist.ReduceOp.AVG and dist.get_backend(group) == "gloo":
        # gloo has no AVG for reduce-scatter; sum then divide gives the same result.
        dist.reduce_scatter_tensor(out, x.contiguous(), op=dist.ReduceOp.SUM, group=group)
        return out.div_(size)
    dist.reduce_scatter_tensor(out, x.contiguous(), op=op, group=group)
    return out


def gather_along(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Non-differentiable all-gather concatenating along ``dim`` (building block)."""
    return _gather_dim0(x.movedim(dim, 0), group).movedim(0, dim)


def gather_uneven_along(
    x: torch.Tensor, dim: int, sizes: Sequence[int], group: dist.ProcessGroup
) -> torch.Tensor:
    """All-gather of blocks of lengths ``sizes`` along ``dim``: pad to the longest, gather, cut."""
    moved = pad_dim0(x.movedim(dim, 0), max(sizes))
    return unpad_gathered(_gather_dim0(moved, group), sizes).movedim(0, dim)


def reduce_scatter_uneven_along(
    x: torch.Tensor, dim: int, sizes: Sequence[int], group: dist.ProcessGroup
) -> torch.Tensor:
    """Sum over ranks, keep this rank's block of length ``sizes[rank]`` (adjoint of the above)."""
    longest = max(sizes)
    blocks = x.movedim(dim, 0).split(list(sizes))
    padded = torch.cat([pad_dim0(b, longest) for b in blocks])
    out = _reduce_scatter_dim0(padded, group, dist.ReduceOp.SUM)
    return out[: sizes[dist.get_rank(group)]].movedim(0, dim)


def reduce_scatter_along(
    x: torch.Tensor, dim: int, group: dist.ProcessGroup, op: dist.ReduceOp = dist.ReduceOp.SUM
) -> torch.Tensor:
    """Non-differentiable reduce-scatter splitting along ``dim`` (building block)."""
    return _reduce_scatter_dim0(x.movedim(dim, 0), group, op).movedim(0, dim)


def all_reduce_tensor(x: torch.Tensor, group: dist.ProcessGroup, op: dist.ReduceOp) -> torch.Tensor:
    """Non-differentiable out-of-place all-reduce (building block)."""
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=op, group=group)
    return out


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: dist.ProcessGroup, sizes) -> torch.Tensor:
        ctx.dim, ctx.group, ctx.sizes = dim, group, sizes
        if sizes is None:
            return gather_along(x, dim, group)
        return gather_uneven_along(x, dim, sizes, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.sizes is None:
            return reduce_scatter_along(grad, ctx.dim, ctx.group), None, None, None
        return reduce_scatter_uneven_along(grad, ctx.dim, ctx.sizes, ctx.group), None, None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: dist.ProcessGroup, op: dist.ReduceOp):
        ctx.dim, ctx.group, ctx.op = dim, group, op
        return reduce_scatter_along(x, dim, group, op)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        full = gather_along(grad, ctx.dim, ctx.group)
        if ctx.op == dist.ReduceOp.AVG:
            full = full / dist.get_world_size(ctx.group)
        return full, None, None, None


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, op: dist.ReduceOp):
        ctx.group, ctx.op = group, op
        return all_reduce_tensor(x, group, op)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_reduce_tensor(grad, ctx.group, ctx.op), None, None


def _all_to_all_dim0(
    x: torch.Tensor,
    output_split_sizes: list[int] | None,
    input_split_sizes: list[int] | None,
    group: dist.ProcessGroup,
) -> torch.Tensor:
    rows = x.shape[0] if output_split_sizes is None else sum(output_split_sizes)
    out = x.new_empty((rows, *x.shape[1:]))
    dist.all_to_all_single(
        out,
        x.contiguous(),
        output_split_sizes=output_split_sizes,
        input_split_sizes=input_split_sizes,
        group=group,
    )
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_split_sizes, input_split_sizes, group):
        ctx.group = group
        ctx.splits = (output_split_sizes, input_split_sizes)
        return _all_to_all_dim0(x, output_split_sizes, input_split_sizes, group)

    @staticmethod
    def backward(ctx, grad):
        output_split_sizes, input_split_sizes = ctx.splits
        return (
            _all_to_all_dim0(grad, input_split_sizes, output_split_sizes, ctx.group),
            None,
            None,
            None,
        )


def exchange_split_sizes(input_split_sizes: Sequence[int], group: dist.ProcessGroup) -> list[int]:
    """How many rows each peer will send here, given how many this rank sends to each peer."""
    size = dist.get_world_size(group)
    if len(input_split_sizes) != size:
        raise ValueError(
            f"input_split_sizes has {len(input_split_sizes)} entries but the group has {size} ranks"
        )
    send = torch.tensor(list(input_split_sizes), dtype=torch.int64)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.tolist()


def _check_splits(name: str, splits: Sequence[int] | None, size: int) -> list[int] | None:
    if splits is None:
        return None
    splits = [int(s) for s in splits]
    if len(splits) != size:
        raise ValueError(f"{name} has {len(splits)} entries but the group has {size} ranks")
    if any(s < 0 for s in splits):
        raise ValueError(f"{name} must be non-negative, got {splits}")
    return splits


def all_gather(
    x: torch.Tensor,
    *,
    dim: int = 0,
    group: GroupLike = None,
    sizes: Sequence[int] | None = None,
    check_shapes: bool | None = None,
) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim``; backward reduce-scatters.

    Without ``sizes`` every rank MUST pass the same shape: it is not checked (that would cost a
    collective per call), and a mismatch gives garbage on one rank and an abort or a hang on
    another. For lengths along ``dim`` that differ by rank, pass ``sizes`` (one length per group
    rank, the same list on every rank): blocks are padded to the longest, gathered and cut, and
    the backward returns each rank its block's gradient. ``check_shapes=True`` (default: the
    ``FORGE_CHECK_COLLECTIVES`` environment variable) exchanges the shapes first and raises a
    ``ValueError`` naming every rank's shape, on every rank, when they do not fit.
    """
    pg = as_process_group(group)
    dim = dim % x.dim()
    if sizes is not None:
        sizes = tuple(check_sizes(x, dim, sizes, pg))
    if shape_checks_enabled(check_shapes):
        check_gather_shapes(x, dim, sizes, pg, "all_gather")
    return _AllGather.apply(x, dim, pg, sizes)


def reduce_scatter(
    x: torch.Tensor, *, dim: int = 0, op: str = "sum", group: GroupLike = None
) -> torch.Tensor:
    """Reduce ``x`` over ranks, then keep this rank's slice of ``dim``; backward all-gathers."""
    pg = as_process_group(group)
    return _ReduceScatter.apply(x, dim % x.dim(), pg, reduce_op_by_name(op))


def all_reduce(x: torch.Tensor, *, op: str = "sum", group: GroupLike = None) -> torch.Tensor:
    """Sum (or average) ``x`` over ranks, out of place; backward all-reduces the gradient."""
    pg = as_process_group(group)
    return _AllReduce.apply(x, pg, reduce_op_by_name(op))


def all_to_all(
    x: torch.Tensor,
    *,
    input_split_sizes: Sequence[int] | None = None,
    output_split_sizes: Sequence[int] | None = None,
    group: GroupLike = None,
) -> torch.Tensor:
    """Send ``input_split_sizes[j]`` rows of ``x`` (dim 0) to rank ``j``; receive from every rank.

    With no split sizes, dim 0 is split evenly. With only ``input_split_sizes``, the output
    sizes are exchanged first (one small extra all-to-all). Backward runs the reverse exchange.
    """
    pg = as_process_group(group)
    size = dist.get_world_size(pg)
    input_split_sizes = _check_splits("input_split_sizes", input_split_sizes, size)
    output_split_sizes = _check_splits("output_split_sizes", output_split_sizes, size)
    if input_split_sizes is None and output_split_sizes is None:
        if x.shape[0] % size != 0:
            raise ValueError(
                f"all_to_all without split sizes splits dim 0 ({x.shape[0]} rows) evenly over "
                f"{size} ranks; pass input_split_sizes for uneven splits"
            )
    elif input_split_sizes is None:
        raise ValueError("output_split_sizes given without input_split_sizes")
    else:
        if sum(input_split_sizes) != x.shape[0]:
            raise ValueError(
                f"input_split_sizes sum to {sum(input_split_sizes)} but x has {x.shape[0]} rows"
            )
        if output_split_sizes is None:
            output_split_sizes = exchange_split_sizes(input_split_sizes, pg)
    return _AllToAll.apply(x, output_split_sizes, input_split_sizes, pg)


class _Send(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dst: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.dst, ctx.group = dst, group
        ctx.meta = (x.shape, x.dtype, x.device)
        dist.send(x.contiguous(), dst=dst, group=group)
        return x.new_empty(0)

    @staticmethod
    def backward(ctx, _unused: torch.Tensor):
        shape, dtype, device = ctx.meta
        grad = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(grad, src=ctx.dst, group=ctx.group)
        return grad, None, None


class _Recv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor: torch.Tensor, shape, dtype, src: int, group: dist.ProcessGroup):
        ctx.src, ctx.group = src, group
        out = torch.empty(shape, dtype=dtype, device=anchor.device)
        dist.recv(out, src=src, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dist.send(grad.contiguous(), dst=ctx.src, group=ctx.group)
        return None, None, None, None, None


def send(x: torch.Tensor, *, dst: int, group: GroupLike = None) -> torch.Tensor:
    """Send ``x`` to group rank ``dst``; returns an empty token tied to ``x`` in the graph.

    Back-propagating through the token (``token.sum()`` added to the loss, or
    ``torch.autograd.backward(token, token.new_empty(0))``) receives ``dL/dx`` from ``dst``,
    which gets there when ``dst`` back-propagates through its :func:`recv`.
    """
    pg = as_process_group(group)
    return _Send.apply(x, global_rank(pg, dst), pg)


def recv(
    shape: Sequence[int],
    *,
    src: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    group: GroupLike = None,
    requires_grad: bool = True,
) -> torch.Tensor:
    """Receive a tensor sent with :func:`send` by group rank ``src``; backward sends its gradient back."""
    pg = as_process_group(group)
    anchor = torch.empty(0, device=device, requires_grad=requires_grad)
    return _Recv.apply(anchor, tuple(shape), dtype, global_rank(pg, src), pg)


def _shift(x: torch.Tensor, offset: int, group: dist.ProcessGroup) -> torch.Tensor:
    size = dist.get_world_size(group)
    if offset % size == 0:
        return x.clone()
    me = dist.get_rank(group)
    to = dist.get_global_rank(group, (me + offset) % size)
    frm = dist.get_global_rank(group, (me - offset) % size)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    ops = [
        dist.P2POp(dist.isend, x.contiguous(), to, group),
        dist.P2POp(dist.irecv, out, frm, group),
    ]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return out


class _Shift(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, offset: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.offset, ctx.group = offset, group
        return _shift(x, offset, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _shift(grad, -ctx.offset, ctx.group), None, None


def shift(x: torch.Tensor, *, offset: int = 1, group: GroupLike = None) -> torch.Tensor:
    """Ring exchange: send ``x`` to rank ``r + offset`` and return what rank ``r - offset`` sent.

    All shapes must match across the group (ring attention passes K/V blocks this way).
    """
    return _Shift.apply(x, offset, as_process_group(group))
