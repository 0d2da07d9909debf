"""Accepting a process group in every form the parallel code holds one."""

from __future__ import annotations

from typing import TypeAlias

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

__all__ = ["GroupLike", "as_process_group", "global_rank", "group_rank", "group_size"]

#: A process group, a 1-D device mesh (``mesh["tp"]``), or ``None`` for the default group.
GroupLike: TypeAlias = dist.ProcessGroup | DeviceMesh | None


def as_process_group(group: GroupLike) -> dist.ProcessGroup:
    """The ``ProcessGroup`` behind ``group``."""
    if group is None:
        if not dist.is_initialized():
            raise RuntimeError(
                "no process group: call forge_core.init_distributed() before using collectives"
            )
        return dist.group.WORLD
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(
                f"collectives run over one mesh axis, but got a {group.ndim}-D mesh with axes "
                f"{group.mesh_dim_names}; pass mesh['<axis>'] (or a flattened axis)"
            )
        return group.get_group()
    return group


def group_size(group: GroupLike) -> int:
    return dist.get_world_size(as_process_group(group))


def group_rank(group: GroupLike) -> int:
    return dist.get_rank(as_process_group(group))


def global_rank(group: GroupLike, rank_in_group: int) -> int:
    """The default-group rank of member ``rank_in_group`` of ``group``."""
    pg = as_process_group(group)
    size = dist.get_world_size(pg)
    if not 0 <= rank_in_group < size:
        raise ValueError(f"rank {rank_in_group} is outside the group of size {size}")
    return dist.get_global_rank(pg, rank_in_group)
