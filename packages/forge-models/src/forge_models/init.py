"""Layout-independent random initialization: every parallel layout draws the values one process
draws.

A model built on the meta device and initialized after parallelization holds, on each rank,
only its shards (FSDP2 / TP / EP ``DTensor`` parameters) and, under pipeline parallelism, meta
parameters for the other stages. Drawing ``normal_`` into those shards directly gives each
layout other weights than one process with the same seed: every rank draws its shard from the
start of the stream, and a stage's skipped meta parameters consume no random numbers, so all
later parameters shift.

:func:`init_` keeps the single process's stream instead: it draws every parameter in full, in
the model's parameter order, on the device of the materialized parameters, and keeps the slice
this rank holds (nothing for a meta parameter). It is what Megatron-LM's
``--use-cpu-initialization`` does for tensor parallelism (initialize the master weight, then
split it), applied to any ``DTensor`` placement and to pipeline stages. The cost: each rank
draws the whole model once (the time of a single-process initialization), with one full
parameter alive at a time. A plain (unsharded, materialized) parameter is drawn in place, so a
single process's weights are unchanged by this module.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["init_", "materialized_device"]


def _dtensor_type():
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def materialized_device(module: torch.nn.Module) -> torch.device | None:
    """The device of ``module``'s first non-meta parameter (its local shard for a ``DTensor``);
    ``None`` when every parameter is on the meta device."""
    dtensor = _dtensor_type()
    for p in module.parameters():
        local = p.to_local() if dtensor is not None and isinstance(p, dtensor) else p
        if local.device.type != "meta":
            return local.device
    return None


@torch.no_grad()
def init_(
    param: torch.Tensor,
    fill: Callable[..., object],
    /,
    *,
    device: torch.device | None = None,
    **kwargs: Any,
) -> None:
    """Initialize ``param`` in place with ``fill(tensor, **kwargs)`` (an in-place initializer,
    e.g. ``init_(w, nn.init.normal_, std=0.02, generator=g)``) as if it were one whole tensor.

    * a plain tensor: ``fill(param)``;
    * a ``DTensor``: ``fill`` on a full ``[global shape]`` tensor on the local shard's device,
      then this rank's slice of it is copied into the local shard;
    * a meta tensor (another pipeline stage's parameter): ``fill`` on a throwaway full tensor on
      ``device``, so the random stream advances as in one process; with ``device=None``
      (nothing materialized) it is skipped.
    """
    dtensor = _dtensor_type()
    sharded = dtensor is not None and isinstance(param, dtensor)
    local = param.to_local() if sharded else param
    if local.device.type == "meta":
        if device is not None:
            fill(torch.empty(param.shape, dtype=param.dtype, device=device), **kwargs)
    elif sharded:
        full = torch.empty(param.shape, dtype=param.dtype, device=local.device)
        fill(full, **kwargs)
        local.copy_(_local_part(full, param))
    else:
        fill(param, **kwargs)


def _local_part(full: torch.Tensor, param) -> torch.Tensor:
    """This rank's part of ``full`` under ``param``'s placements: the elements
    :func:`forge_models.local_shards.local_index` says it holds (the rule the sharded
    checkpoint load follows, FSDP2 over tensor parallelism with uneven sizes included)."""
    from forge_models.local_shards import local_index

    part = full
    for dim, positions in enumerate(local_index(param)):
        part = part.index_select(dim, positions.to(full.device))
    return part
