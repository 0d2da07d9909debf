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
(packed projections: the pieces are the gate and up halves).

FSDP2 over tensor parallelism marks its dim with ``_StridedShard(d, split_factor=f)`` where
``f`` is the product of the later mesh dims that shard ``d`` too, and it really shards the
tensor-parallel *local* shard: the later placements apply first, then FSDP's ``torch.chunk``
of what they left (padding its last chunk in memory; the local tensor is unpadded). With even
sizes this equals the pieces rule above; with uneven ones (a dim the tensor-parallel or FSDP
degree does not divide) only this order gives the elements FSDP holds, so it is the one
followed whenever the later placements account for the split factor.
"""

from __future__ import annotations

import math

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


def _apply(
    placement: Shard | _StridedShard, positions: torch.Tensor, n: int, rank: int
) -> torch.Tensor:
    """The positions along one dim that ``placement`` over ``n`` ranks leaves to ``rank``."""
    if isinstance(placement, _StridedShard):
        pieces = _chunk(positions, int(placement.split_factor))
        return torch.cat([_chunk(piece, n)[rank] for piece in pieces])
    return _chunk(positions, n)[rank]


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
    placements = tuple(tensor.placements)
    done: set[int] = set()
    for mesh_dim, placement in enumerate(placements):
        if mesh_dim in done:
            continue
        if not isinstance(placement, Shard | _StridedShard | Replicate):
            raise ValueError(
                f"cannot load into a DTensor with placement {placement} (a partial sum has no "
                "single value per element); load before turning parameters into partials"
            )
        if isinstance(placement, _StridedShard):
            dim = placement.dim % ndim
            later = [
                j
                for j in range(mesh_dim + 1, len(placements))
                if isinstance(placements[j], Shard | _StridedShard)
                and placements[j].dim % ndim == dim
            ]
            if later and math.prod(mesh.size(j) for j in later) == placement.split_factor:
                # FSDP2 over tensor parallelism: the later shardings first, then this one.
                for j in later:
                    index[dim] = _apply(placements[j], index[dim], mesh.size(j), coordinate[j])
                done.update(later)
                index[dim] = _chunk(index[dim], mesh.size(mesh_dim))[coordinate[mesh_dim]]
                continue
        if isinstance(placement, Shard | _StridedShard):
            dim = placement.dim % ndim
            index[dim] = _apply(placement, index[dim], mesh.size(mesh_dim), coordinate[mesh_dim])
    local_shape = tuple(tensor.to_local().shape)
    got = tuple(len(i) for i in index)
    if got != local_shape:
        raise ValueError(
            f"the placements {tensor.placements} of a {tuple(tensor.shape)} DTensor give a local "
            f"shard of shape {got}, but it holds {local_shape}: an uneven sharding this loader "
            "does not model; load into the unsharded model and shard it afterwards"
        )
    return index
