"""The conjugate ``f`` / ``g`` operators of Megatron-LM tensor parallelism.

From Shoeybi et al., "Megatron-LM: Training Multi-Billion Parameter Language Models Using
Model Parallelism" (2019), section 3: in a column-parallel then row-parallel MLP, ``f`` is the
identity in the forward pass and an all-reduce in the backward pass; ``g`` is an all-reduce in
the forward pass and the identity in the backward pass. They differ from the exact ops of
:mod:`forge_core.collectives.differentiable` in what they assume about the tensor on the
*replicated* side: it is one logical tensor that every rank holds (and computes on) identically,
so its gradient is counted once, not once per rank.

=========================  ==========================  ==========================
op                         forward                     backward
=========================  ==========================  ==========================
``copy_to_group`` (f)      identity                    all-reduce (sum)
``reduce_from_group`` (g)  all-reduce (sum)            identity
``scatter_to_group``       keep this rank's chunk      all-gather
``gather_from_group``      all-gather                  keep this rank's chunk
=========================  ==========================  ==========================

Sequence parallelism (Korthikanti et al., "Reducing Activation Recomputation in Large
Transformer Models", 2022) pairs an all-gather with a reduce-scatter backward and vice versa:
those are exactly :func:`~forge_core.collectives.all_gather` and
:func:`~forge_core.collectives.reduce_scatter`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from forge_core.collectives.differentiable import all_reduce_tensor, gather_along
from forge_core.collectives.groups import GroupLike, as_process_group

__all__ = ["copy_to_group", "gather_from_group", "reduce_from_group", "scatter_to_group"]


def _local_chunk(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    size = dist.get_world_size(group)
    if x.shape[dim] % size != 0:
        raise ValueError(
            f"cannot split dim {dim} of size {x.shape[dim]} into {size} equal parts for the "
            f"group of {size} ranks; pad it to a multiple of {size}"
        )
    return x.chunk(size, dim=dim)[dist.get_rank(group)].contiguous()


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_reduce_tensor(grad, ctx.group, dist.ReduceOp.SUM), None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        return all_reduce_tensor(x, group, dist.ReduceOp.SUM)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _ScatterToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        return _local_chunk(x, dim, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return gather_along(grad, ctx.dim, ctx.group), None, None


class _GatherFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        return gather_along(x, dim, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _local_chunk(grad, ctx.dim, ctx.group), None, None


def copy_to_group(x: torch.Tensor, *, group: GroupLike = None) -> torch.Tensor:
    """``f``: enter a parallel region with a replicated input (backward sums the partial grads)."""
    return _CopyToGroup.apply(x, as_process_group(group))


def reduce_from_group(x: torch.Tensor, *, group: GroupLike = None) -> torch.Tensor:
    """``g``: leave a parallel region by summing partial results into a replicated output."""
    return _ReduceFromGroup.apply(x, as_process_group(group))


def scatter_to_group(x: torch.Tensor, *, dim: int = -1, group: GroupLike = None) -> torch.Tensor:
    """Split a replicated tensor along ``dim`` and keep this rank's chunk."""
    return _ScatterToGroup.apply(x, dim % x.dim(), as_process_group(group))


def gather_from_group(x: torch.Tensor, *, dim: int = -1, group: GroupLike = None) -> torch.Tensor:
    """Concatenate every rank's chunk along ``dim`` into a replicated tensor."""
    return _GatherFromGroup.apply(x, dim % x.dim(), as_process_group(group))
