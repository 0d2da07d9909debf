"""A simulated process group for metadata-only tests at large world sizes.

PyTorch's ``fake`` backend accepts every collective and communicates nothing, so placement,
mesh layout and sharding metadata can be checked for, say, rank 517 of 1024 in one process::

    with fake_process_group(world_size=1024, rank=517):
        mesh = ParallelDims(world_size=1024, tp=8, pp=4).build_mesh("cpu")
        assert mesh["tp"].size() == 8

Numerical results under it are meaningless; use the worker pool for those.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.distributed as dist

__all__ = ["fake_process_group"]


@contextlib.contextmanager
def fake_process_group(*, world_size: int, rank: int = 0) -> Iterator[None]:
    """Initialise the default process group with the fake backend for the ``with`` block."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError(
            "a default process group already exists in this process; fake_process_group() "
            "needs to create its own (run it outside init_distributed())"
        )
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
