"""Gradient clipping by the global norm of a pipeline-parallel model.

Each pipeline rank holds only its stages' gradients, so the squared norms (or maxima) of the
ranks are combined over the pipeline group: every rank scales by the same coefficient, as one
process holding the whole model would. Within a stage the norm is taken by
:func:`forge_parallel.total_grad_norm` (which reduces over the tensor/data-parallel mesh axes of
DTensor gradients).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from forge_parallel.grad_norm import align_grads, total_grad_norm

__all__ = ["pipeline_clip_grad_norm_", "pipeline_grad_norm"]


@torch.no_grad()
def pipeline_grad_norm(
    parameters: Iterable[torch.Tensor], pp_group: dist.ProcessGroup, norm_type: float = 2.0
) -> torch.Tensor:
    """The norm of the gradients of all pipeline ranks' ``parameters`` (a collective)."""
    parameters = [p for p in parameters if p.grad is not None]
    align_grads(parameters)
    norm_type = float(norm_type)
    local = total_grad_norm(parameters, norm_type).float()
    if math.isinf(norm_type):
        dist.all_reduce(local, op=dist.ReduceOp.MAX, group=pp_group)
        return local
    value = local.pow(norm_type)
    dist.all_reduce(value, op=dist.ReduceOp.SUM, group=pp_group)
    return value.pow(1.0 / norm_type)


@torch.no_grad()
def pipeline_clip_grad_norm_(
    parameters: Iterable[torch.Tensor],
    max_norm: float,
    pp_group: dist.ProcessGroup,
    norm_type: float = 2.0,
    *,
    counted: Iterable[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Scale every pipeline rank's gradients so their global norm is at most ``max_norm``.

    Same rule as ``torch.nn.utils.clip_grad_norm_`` (``max_norm / (norm + 1e-6)`` clamped to
    1); returns the global norm (the same on every rank). ``counted``: the parameters whose
    gradients make up the norm (default: all of ``parameters``; leave out the extra copies of
    a parameter several pipeline ranks hold, see ``Pipeline.norm_parameters``).
    """
    parameters = [p for p in parameters if p.grad is not None]
    counted = parameters if counted is None else [p for p in counted if p.grad is not None]
    total = pipeline_grad_norm(counted, pp_group, norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in parameters:
        grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        grad.mul_(coef.to(grad.device, grad.dtype))
    return total
