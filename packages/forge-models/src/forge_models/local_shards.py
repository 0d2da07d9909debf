"""Which elements of a full tensor this process holds: per-dim global indices of a DTensor shard.

A parameter sharded by FSDP2 (``Shard(0)``), tensor parallelism (``Shard(0)`` / ``Shard(1)``,
``Replicate``), packed column parallelism (``_StridedShard(0, split_factor=2)``: each half of
``[gate; up]`` split separately) or expert parallelism (``Shard(0)`` over the experts) holds
the box ``full[ix_(index[0], index[1], ...)]`` of its full tensor, where ``index[d]`` lists the
global positions along dim ``d`` in local order. :func:`local_index` computes those lists from
the placements alone (no communication), so a loader can read exactly the rank's elements from
a checkpoint.

Placements apply left to right over the mesh dims, as ``distribute_tensor`` applies them:
``Shard(d)`` splits the current positions along ``d`` into ``mesh size`` chunks
(``torch.chunk``, later chunks possibly empty) and keeps this rank's;
``_StridedShard(d, split_factor=f)`` first splits them into ``f`` pieces, splits each piece
into ``mesh size`` chunks, and keeps the concatenation of this rank's chunk of every piece
(the right-to-left order of FSDP2 over TP, and packed projections).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

__all__ = ["full_index", "local_index"]


def full_index(shape: tuple[int, ...] | torch.Size) -> list[torch.Tensor]:
    """Every position of every dim (a tensor held whole)."""
    return [torch.arange(size) for size in shape]


def _chunk(positions: torch.Tensor, n: int) -> list[torch.Tensor]:
    """``torch.chunk`` into exactly ``n`` parts (the last ones empty when it gives fewer)."""
    parts = list(torch.chunk(positions, n)) if positions.numel() else []
    return parts + [positions[:0]] * (n - len(parts))


def local_index(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Per-dim global positions of this process's local part of ``tensor``.

    A plain tensor is held whole. A DTensor's lists follow its placements (see the module
    docstring); their lengths equal ``tensor.to_local().shape``, which is checked.
    """
    if not isinstance(tensor, DTensor):
        return full_index(tensor.shape)
    mesh = tensor.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise ValueError(
            "this process is not in the device mesh of the DTensor it should load; load on "
            "the ranks of the mesh the model was parallelized over"
        )
    index = full_index(tensor.shape)
    ndim = len(index)
    for mesh_dim, placement in enumerate(tensor.placements):
        n, rank = mesh.size(mesh_dim), coordinate[mesh_dim]
        if isinstance(placement, _StridedShard):
            dim = placement.dim % ndim
            pieces = _chunk(index[dim], int(placement.split_factor))
            index[dim] = torch.cat([_chunk(piece, n)[rank] for piece in pieces])
        elif isinstance(placement, Shard):
            dim = placement.dim % ndim
            index[dim] = _chunk(index[dim], n)[rank]
        elif not isinstance(placement, Replicate):
            raise ValueError(
                f"cannot load into a DTensor with placement {placement} (a partial sum has no "
                "single value per element); load before turning parameters into partials"
            )
    local_shape = tuple(tensor.to_local().shape)
    got = tuple(len(i) for i in index)
    if got != local_shape:
        raise ValueError(
            f"the placements {tensor.placements} of a {tuple(tensor.shape)} DTensor give a local "
            f"shard of shape {got}, but it holds {local_shape}: an uneven sharding this loader "
            "does not model; load into the unsharded model and shard it afterwards"
        )
    return index
