"""Parallel degrees of a job, validated once, and the named device mesh built from them.

Ranks are laid out in the order ``pp, dp_replicate, dp_shard, cp, tp`` (tensor parallel
innermost, so a TP group sits on the fastest links of one node), as in Megatron-Core and
torchtitan. Derived (flattened) axes name the groups that the parallel code needs:

==============  ==============================  ==========================================
axis            ranks                           used for
==============  ==============================  ==========================================
``dp``          dp_replicate x dp_shard         data loading (ranks that see different data)
``dp_shard_cp`` dp_shard x cp                   FSDP sharding (CP ranks share the shards)
``dp_cp``       dp_replicate x dp_shard x cp    loss and gradient averaging
==============  ==============================  ==========================================

HSDP shards within ``dp_shard x cp`` and replicates across ``dp_replicate``: its 2-D mesh is
``mesh["dp_replicate", "dp_shard_cp"]`` (the ``dp_cp`` axis unflattened, so it shares the root
mesh with ``tp`` and composes with tensor parallelism).

Expert parallelism reuses the ranks of data and context parallelism (and of tensor parallelism
when ``etp=1``), as in Megatron-Core's expert layout: within one pipeline stage and replica,
the ``dp_shard x cp x tp`` ranks are regrouped as ``edp_shard x ep x etp`` (``etp`` innermost).
That second layout is a separate mesh over the same ranks, with axes ``edp_shard``, ``ep``,
``etp`` and the flattened ``edp`` (``dp_replicate x edp_shard``: ranks holding the same experts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

__all__ = ["ParallelDims", "ParallelMesh"]

DENSE_AXES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
EXPERT_AXES = ("pp", "dp_replicate", "edp_shard", "ep", "etp")
_FLATTENED_DENSE = {
    "dp": ("dp_replicate", "dp_shard"),
    "dp_shard_cp": ("dp_shard", "cp"),
    "dp_cp": ("dp_replicate", "dp_shard", "cp"),
}
_FLATTENED_EXPERT = {"edp": ("dp_replicate", "edp_shard")}
#: Multi-axis meshes unflattened from a flattened axis on first use (a collective): axes -> source.
_UNFLATTENED_DENSE = {("dp_replicate", "dp_shard_cp"): "dp_cp"}
_INFERABLE = ("dp_replicate", "dp_shard", "cp", "tp", "pp")


@dataclass(frozen=True, kw_only=True)
class ParallelDims:
    """Degrees of every parallel dimension; they must multiply to ``world_size``.

    Exactly one of ``dp_replicate``, ``dp_shard``, ``cp``, ``tp``, ``pp`` may be ``-1`` and is
    then inferred (``dp_shard=-1`` is the default: every rank not used otherwise shards data).
    ``ep`` (expert parallel) borrows ranks from ``dp_shard x cp`` (``etp == tp``) or from
    ``dp_shard x cp x tp`` (``etp == 1``); ``etp`` defaults to ``tp``.

    >>> ParallelDims(world_size=8, tp=2)
    ParallelDims(world_size=8, dp_replicate=1, dp_shard=4, cp=1, tp=2, pp=1, ep=1, etp=2)
    """

    world_size: int
    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = field(default=None)

    def __post_init__(self) -> None:
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"world_size must be a positive integer, got {self.world_size!r}")
        for name in (*_INFERABLE, "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value == 0 or value < -1:
                raise ValueError(
                    f"{name} must be a positive integer (or -1 to infer it), got {value!r}"
                )
        if self.ep == -1:
            raise ValueError(
                "ep cannot be inferred (-1); give the expert-parallel degree explicitly"
            )
        inferred = [name for name in _INFERABLE if getattr(self, name) == -1]
        if len(inferred) > 1:
            raise ValueError(
                f"at most one degree can be inferred, but {' and '.join(inferred)} are -1; "
                "give all but one of them explicitly"
            )
        known = math.prod(getattr(self, n) for n in _INFERABLE if getattr(self, n) != -1)
        if inferred:
            name = inferred[0]
            if self.world_size % known != 0:
                raise ValueError(
                    f"cannot infer {name}: world_size {self.world_size} is not divisible by "
                    f"{self._product_text(exclude=name)} = {known}. Choose degrees whose "
                    f"product divides {self.world_size}."
                )
            object.__setattr__(self, name, self.world_size // known)
        elif known != self.world_size:
            raise ValueError(
                f"{self._product_text()} = {known}, but world_size is {self.world_size}. "
                "The degrees must multiply to the world size: set one of them to -1 to infer it "
                f"(e.g. dp_shard=-1), or launch {known} processes."
            )
        self._resolve_expert_layout()

    def _product_text(self, exclude: str | None = None) -> str:
        return " x ".join(f"{n}({getattr(self, n)})" for n in _INFERABLE if n != exclude)

    def _resolve_expert_layout(self) -> None:
        etp = self.tp if self.etp is None else self.etp
        if etp not in (1, self.tp):
            raise ValueError(
                f"etp (expert tensor parallel) must be 1 or equal to tp={self.tp}, got {etp}"
            )
        object.__setattr__(self, "etp", etp)
        if self.ep == 1:
            return
        borrowed = self.dp_shard * self.cp * (self.tp // etp)
        source = "dp_shard x cp" if etp == self.tp else "dp_shard x cp x tp"
        if borrowed % self.ep != 0:
            raise ValueError(
                f"ep={self.ep} must divide {source} = {borrowed} (expert parallelism reuses those "
                f"ranks, with etp={etp}); choose ep among the divisors of {borrowed}"
            )

    # -- derived sizes -------------------------------------------------------------------
    @property
    def dp(self) -> int:
        """Ranks that see different data: ``dp_replicate x dp_shard``."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_shard_cp(self) -> int:
        """Ranks FSDP shards parameters over: ``dp_shard x cp``."""
        return self.dp_shard * self.cp

    @property
    def dp_cp(self) -> int:
        """Ranks the loss and gradients are averaged over: ``dp x cp``."""
        return self.dp * self.cp

    @property
    def edp_shard(self) -> int:
        """Ranks sharding each expert's parameters within a replica (expert FSDP)."""
        return self.dp_shard * self.cp * self.tp // (self.ep * self.etp)

    @property
    def edp(self) -> int:
        """Ranks holding copies (or shards) of the same experts: ``dp_replicate x edp_shard``."""
        return self.dp_replicate * self.edp_shard

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard_cp > 1

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    def degrees(self) -> dict[str, int]:
        """All degrees by name (after inference)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def coordinates(self, rank: int) -> dict[str, int]:
        """This rank's index along each dense and expert axis, without a process group."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside [0, {self.world_size})")
        dense = torch.arange(self.world_size).reshape(self._dense_shape())
        expert = torch.arange(self.world_size).reshape(self._expert_shape())
        coords = dict(zip(DENSE_AXES, (int(i) for i in (dense == rank).nonzero()[0]), strict=True))
        expert_coords = (int(i) for i in (expert == rank).nonzero()[0])
        for name, idx in zip(EXPERT_AXES, expert_coords, strict=True):
            coords.setdefault(name, idx)
        return coords

    def _dense_shape(self) -> tuple[int, ...]:
        return (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp)

    def _expert_shape(self) -> tuple[int, ...]:
        return (self.pp, self.dp_replicate, self.edp_shard, self.ep, self.etp)

    def build_mesh(self, device_type: str | None = None) -> ParallelMesh:
        """Build the named device meshes (a collective: every rank must call it).

        Needs an initialised default process group whose size is ``world_size``.
        ``device_type`` defaults to the current accelerator's.
        """
        if not dist.is_initialized():
            raise RuntimeError(
                "build_mesh() needs the default process group: call "
                "forge_core.init_distributed() first"
            )
        if dist.get_world_size() != self.world_size:
            raise ValueError(
                f"these ParallelDims are for world_size={self.world_size}, but the process group "
                f"has {dist.get_world_size()} ranks"
            )
        if device_type is None:
            from forge_core.backends import current_accelerator

            device_type = current_accelerator().device_type
        ranks = torch.arange(self.world_size)
        dense = DeviceMesh(
            device_type, ranks.reshape(self._dense_shape()), mesh_dim_names=DENSE_AXES
        )
        # Flattened axes are kept by name: slicing them back out of the root mesh is deprecated.
        flattened = {name: dense[axes]._flatten(name) for name, axes in _FLATTENED_DENSE.items()}
        expert = None
        if self.ep_enabled:
            expert = DeviceMesh(
                device_type, ranks.reshape(self._expert_shape()), mesh_dim_names=EXPERT_AXES
            )
            for name, axes in _FLATTENED_EXPERT.items():
                flattened[name] = expert[axes]._flatten(name)
        return ParallelMesh(dims=self, dense=dense, expert=expert, flattened=flattened)


@dataclass(frozen=True, kw_only=True)
class ParallelMesh:
    """The meshes of a job: ``mesh["tp"]`` gives the 1-D mesh of one named axis.

    Dense axes: ``pp, dp_replicate, dp_shard, cp, tp`` and the flattened ``dp, dp_shard_cp,
    dp_cp``; the 2-D HSDP mesh ``("dp_replicate", "dp_shard_cp")``. Expert axes (only when
    ``ep > 1``): ``edp_shard, ep, etp, edp``.
    """

    dims: ParallelDims
    dense: DeviceMesh
    expert: DeviceMesh | None
    flattened: dict[str, DeviceMesh]
    unflattened: dict[tuple[str, ...], DeviceMesh] = field(default_factory=dict)

    @property
    def axes(self) -> tuple[str, ...]:
        names = DENSE_AXES
        if self.expert is not None:
            names += tuple(a for a in EXPERT_AXES if a not in names)
        return names + tuple(self.flattened)

    def __getitem__(self, axis: str | tuple[str, ...]) -> DeviceMesh:
        """The sub-mesh of one axis (or several adjacent axes, e.g. ``("dp_shard", "cp")``).

        ``("dp_replicate", "dp_shard_cp")`` is HSDP's 2-D mesh; the first access builds it
        (a collective: every rank must ask for it).
        """
        if isinstance(axis, str) and axis in self.flattened:
            return self.flattened[axis]
        if isinstance(axis, tuple) and axis in _UNFLATTENED_DENSE:
            if axis not in self.unflattened:
                sizes = tuple(getattr(self.dims, name) for name in axis)
                source = self.flattened[_UNFLATTENED_DENSE[axis]]
                self.unflattened[axis] = source._unflatten(0, sizes, axis)
            return self.unflattened[axis]
        names = (axis,) if isinstance(axis, str) else tuple(axis)
        expert_only = set(EXPERT_AXES) | set(_FLATTENED_EXPERT)
        expert_only -= set(DENSE_AXES)
        if any(n in expert_only for n in names):
            if self.expert is None:
                raise KeyError(
                    f"axis {axis!r} belongs to the expert-parallel layout, which is only built "
                    "when ep > 1"
                )
            return self.expert[axis]
        unknown = [n for n in names if n not in self.axes]
        if unknown:
            raise KeyError(f"unknown mesh axis {unknown[0]!r}; axes are {', '.join(self.axes)}")
        return self.dense[axis]

    def group(self, axis: str) -> dist.ProcessGroup:
        """The process group of one axis for this rank."""
        return self[axis].get_group()

    def size(self, axis: str) -> int:
        return self[axis].size()

    def local_rank(self, axis: str) -> int:
        """This rank's index along ``axis``."""
        return self[axis].get_local_rank()
