"""Gradient averaging across data-parallel ranks with forge-core's async collectives.

Gradients are packed into buckets of about ``bucket_mb`` and each bucket's all-reduce is started
before the next one is packed, so packing overlaps communication (the DDP bucketing idea of Li
et al., "PyTorch Distributed: Experiences on Accelerating Data Parallel Training", 2020). The
full parallel engine (FSDP, TP, PP, ...) comes with forge-parallel; this is the default job's
plain data parallelism.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.device_mesh import DeviceMesh

from forge_core.collectives import all_reduce_async, overlapped

__all__ = ["average_gradients"]


def _buckets(params: list[torch.nn.Parameter], bucket_bytes: int) -> list[list[torch.nn.Parameter]]:
    buckets, current, size = [], [], 0
    for p in params:
        current.append(p)
        size += p.grad.numel() * p.grad.element_size()
        if size >= bucket_bytes:
            buckets.append(current)
            current, size = [], 0
    if current:
        buckets.append(current)
    return buckets


def average_gradients(
    parameters: Iterable[torch.nn.Parameter], group: DeviceMesh, *, bucket_mb: float = 25.0
) -> None:
    """Replace every ``p.grad`` by its mean over the ranks of ``group``."""
    params = [p for p in parameters if p.grad is not None]
    if group.size() == 1 or not params:
        return

    def write_back(bucket: list[torch.nn.Parameter], averaged: torch.Tensor) -> None:
        offset = 0
        for p in bucket:
            n = p.grad.numel()
            p.grad.copy_(averaged[offset : offset + n].view_as(p.grad))
            offset += n

    overlapped(
        _buckets(params, int(bucket_mb * 2**20)),
        communicate=lambda bucket: all_reduce_async(
            torch.cat([p.grad.flatten() for p in bucket]), op="avg", group=group
        ),
        compute=write_back,
    )
