"""Autograd-aware collectives over any process group or mesh axis.

- :mod:`~forge_core.collectives.differentiable`: exact-gradient all-gather, reduce-scatter,
  all-reduce, variable all-to-all, send/recv and ring shift.
- :mod:`~forge_core.collectives.regions`: Megatron's conjugate ``f``/``g`` operators for
  tensors replicated across a tensor-parallel group.
- :mod:`~forge_core.collectives.async_ops`: handles for overlapping communication and compute.
"""

from forge_core.collectives.async_ops import (
    PendingCollective,
    all_gather_async,
    all_reduce_async,
    all_to_all_async,
    overlapped,
    reduce_scatter_async,
)
from forge_core.collectives.differentiable import (
    all_gather,
    all_reduce,
    all_to_all,
    recv,
    reduce_scatter,
    send,
    shift,
)
from forge_core.collectives.groups import GroupLike, as_process_group, global_rank
from forge_core.collectives.regions import (
    copy_to_group,
    gather_from_group,
    reduce_from_group,
    scatter_to_group,
)

__all__ = [
    "GroupLike",
    "PendingCollective",
    "all_gather",
    "all_gather_async",
    "all_reduce",
    "all_reduce_async",
    "all_to_all",
    "all_to_all_async",
    "as_process_group",
    "copy_to_group",
    "gather_from_group",
    "global_rank",
    "overlapped",
    "recv",
    "reduce_from_group",
    "reduce_scatter",
    "reduce_scatter_async",
    "scatter_to_group",
    "send",
    "shift",
]
