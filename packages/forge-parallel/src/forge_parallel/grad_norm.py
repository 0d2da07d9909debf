"""Gradient clipping by the global norm, for any mix of plain and DTensor parameters.

After ``parallelize`` a model's parameters can live on different meshes (tensor-parallel
weights as 2-D ``(dp_shard_cp, tp)`` DTensors, norms only FSDP-sharded on ``dp_shard_cp``,
buffers of untouched modules as plain tensors). The norm is computed per group of equal
(mesh, placements) from local shards with one reduction per sharded mesh axis, so every rank
gets the same global norm as a single process would, at one all-reduce per group.

DTensor leaves some gradients in a different layout than their parameter: a sequence-parallel
norm weight (``Replicate``) gets a ``Partial`` gradient (each rank's sum over its sequence
shard), a vocab-parallel embedding a ``Replicate`` one. :func:`align_grads` moves them to the
parameter's placements (one all-reduce for ``Partial``); clipping does it first.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

__all__ = ["align_grads", "clip_grad_norm_", "total_grad_norm"]


def _grouped(grads: list[torch.Tensor]) -> dict[object, list[torch.Tensor]]:
    groups: dict[object, list[torch.Tensor]] = {}
    for g in grads:
        key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else None
        groups.setdefault(key, []).append(g)
    return groups


@torch.no_grad()
def align_grads(parameters: Iterable[torch.Tensor]) -> None:
    """Redistribute each DTensor gradient to its parameter's placements (in place)."""
    for p in parameters:
        g = p.grad
        if isinstance(p, DTensor) and isinstance(g, DTensor) and g.placements != p.placements:
            p.grad = g.redistribute(p.device_mesh, p.placements)


@torch.no_grad()
def total_grad_norm(parameters: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The norm of all gradients of ``parameters`` taken together (a collective for DTensors).

    Gradients must not be ``Partial``: call :func:`align_grads` first.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    norm_type = float(norm_type)
    inf = math.isinf(norm_type)
    if not grads:
        return torch.tensor(0.0)
    parts = []
    for key, group in _grouped(grads).items():
        local = [g.to_local() if isinstance(g, DTensor) else g for g in group]
        # An FSDP shard may be empty on this rank (a parameter smaller than the mesh): the
        # infinity norm of no elements raises, so such tensors count as 0 (every rank must
        # still join the reductions below).
        local = [t for t in local if t.numel()]
        if local:
            # Accumulated in float64: torch's float32 norm kernel on the CPU loses about 1e-4
            # of a 2M-element gradient (a vocabulary embedding), more than the layouts differ by.
            norms = torch.stack(torch._foreach_norm(local, norm_type, dtype=torch.float64))
            value = norms.max() if inf else norms.pow(norm_type).sum()
        else:
            device = group[0].device
            value = torch.zeros((), dtype=torch.float64, device=device)
        if key is not None:
            mesh, placements = key
            for axis, placement in enumerate(placements):
                if isinstance(placement, Replicate):
                    continue
                if placement.is_partial():
                    raise ValueError("a gradient is Partial: call align_grads(parameters) first")
                op = dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM
                dist.all_reduce(value, op=op, group=mesh.get_group(axis))
        parts.append(value)
    stacked = torch.stack(parts)
    return (stacked.max() if inf else stacked.sum().pow(1.0 / norm_type)).float()


@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0
) -> torch.Tensor:
    """Scale the gradients so their global norm is at most ``max_norm``; returns the norm.

    Same scaling rule as ``torch.nn.utils.clip_grad_norm_`` (``max_norm / (norm + 1e-6)``,
    clamped to 1). With :class:`~forge_parallel.ZeroOptimizer` use its ``clip_grad_norm_``.
    """
    parameters = [p for p in parameters if p.grad is not None]
    align_grads(parameters)
    total = total_grad_norm(parameters, norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in parameters:
        grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        grad.mul_(coef.to(grad.device, grad.dtype))
    return total
