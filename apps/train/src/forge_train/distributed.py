"""Small collective helpers of the loop (process groups passed explicitly; ``None``: one rank)."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_reduce", "local_value"]


def all_reduce(value: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """``value`` reduced in place over ``group`` (unchanged when ``group`` is ``None``)."""
    if group is not None:
        dist.all_reduce(value, op=op, group=group)
    return value


def local_value(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a (replicated) DTensor loss."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value
