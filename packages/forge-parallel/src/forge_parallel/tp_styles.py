"""Parallel styles that PyTorch's ``torch.distributed.tensor.parallel`` does not ship.

- :class:`PackedColwiseParallel`: a column-parallel ``nn.Linear`` whose output packs several
  equal sub-matrices, such as a fused SwiGLU ``gate_up_proj`` (``[gate; up]``). Plain
  column sharding would give rank 0 all of ``gate`` and rank 1 all of ``up``; here each rank holds
  ``[gate_r; up_r]``, so ``chunk(2, dim=-1)`` on its local output still separates gate and up.
  The weight is a DTensor with a ``_StridedShard(0, split_factor=chunks)`` placement, so
  ``full_tensor()`` and state dicts see the original, unpermuted layout.
- :class:`BlockInput`: the shared input of a block's column-parallel projections; under
  sequence parallelism (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models") it all-gathers the sequence shards (the backward reduce-scatters).
- :class:`SequenceScatter`: split a replicated activation into sequence shards.

The conjugate operators follow Megatron-LM's ``f``/``g`` notation (Shoeybi et al. 2019); the
``f`` of a packed column-parallel layer is :func:`forge_core.collectives.copy_to_group`.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle
from torch.distributed.tensor.placement_types import _StridedShard

from forge_core.collectives import copy_to_group

__all__ = ["BlockInput", "PackedColwiseParallel", "SequenceScatter", "is_packed"]


def is_packed(param: torch.Tensor) -> bool:
    """Whether ``param`` is a DTensor sharded by :class:`PackedColwiseParallel`."""
    return isinstance(param, DTensor) and any(
        isinstance(p, _StridedShard) for p in param.placements
    )


def _packed_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    group = self._forge_tp_mesh
    if isinstance(x, DTensor):
        # A replicated DTensor (from BlockInput): its gradient here is a partial sum.
        x = x.redistribute(x.device_mesh, [Replicate()] * x.device_mesh.ndim)
        x = x.to_local(grad_placements=[Partial()] * x.device_mesh.ndim)
    else:
        x = copy_to_group(x, group=group)  # f: identity forward, all-reduce backward
    weight = self.weight.to_local() if isinstance(self.weight, DTensor) else self.weight
    bias = self.bias
    if isinstance(bias, DTensor):
        bias = bias.to_local()
    return F.linear(x, weight, bias)


class PackedColwiseParallel(ParallelStyle):
    """Column parallelism for an ``nn.Linear`` whose output is ``chunks`` stacked sub-matrices.

    The output is local (each rank's ``[part_0_r; part_1_r; ...]``); the input is replicated.
    """

    def __init__(self, chunks: int = 2) -> None:
        super().__init__()
        if chunks < 1:
            raise ValueError(f"chunks must be >= 1, got {chunks}")
        self.chunks = chunks

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, nn.Linear):
            raise ValueError(f"colwise_packed applies to nn.Linear, got {type(module).__name__}")
        placement = _StridedShard(0, split_factor=self.chunks)
        for name, param in list(module.named_parameters(recurse=False)):
            sharded = distribute_tensor(param.detach(), device_mesh, [placement])
            module.register_parameter(
                name, nn.Parameter(sharded, requires_grad=param.requires_grad)
            )
        module._forge_tp_mesh = device_mesh
        module.forward = types.MethodType(_packed_linear_forward, module)
        return module


def _first_tensor_argument(args: tuple, kwargs: dict, kwarg: str) -> tuple[torch.Tensor, Any]:
    if args and isinstance(args[0], torch.Tensor):
        return args[0], 0
    if isinstance(kwargs.get(kwarg), torch.Tensor):
        return kwargs[kwarg], kwarg
    raise ValueError(
        f"sequence-parallel transition found no tensor input: expected it as the first "
        f"positional argument or as the keyword {kwarg!r}"
    )


def _replace(args: tuple, kwargs: dict, where: Any, value: torch.Tensor) -> tuple[tuple, dict]:
    if where == 0:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, where: value}


def _check_sequence(x: torch.Tensor, dim: int, size: int, what: str) -> None:
    length = x.shape[dim]
    if length % size != 0:
        raise ValueError(
            f"{what}: sequence length {length} (dim {dim}) is not divisible by tp={size}; "
            f"pad sequences to a multiple of {size} for sequence parallelism"
        )


class BlockInput(ParallelStyle):
    """The input (first tensor argument, or ``kwarg``) of a block of column-parallel layers.

    With sequence parallelism it is all-gathered from sequence shards (``Shard(sequence_dim)
    -> Replicate``; the backward reduce-scatters). Without, it is marked replicated. Either
    way the block receives one replicated DTensor, so its column-parallel projections (q, k, v)
    add their partial input gradients into one tensor and reduce them once: Megatron's ``f``
    for the whole block, instead of one all-reduce per projection.
    """

    def __init__(
        self, *, sequence_parallel: bool, sequence_dim: int = 1, kwarg: str = "hidden_states"
    ) -> None:
        super().__init__()
        self.sequence_parallel = sequence_parallel
        self.sequence_dim = sequence_dim
        self.kwarg = kwarg

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        dim, kwarg = self.sequence_dim, self.kwarg
        layout = Shard(dim) if self.sequence_parallel else Replicate()

        def hook(_mod: nn.Module, args: tuple, kwargs: dict):
            x, where = _first_tensor_argument(args, kwargs, kwarg)
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, device_mesh, [layout], run_check=False)
            x = x.redistribute(device_mesh, [Replicate()])
            return _replace(args, kwargs, where, x)

        module.register_forward_pre_hook(hook, with_kwargs=True)
        return module


class SequenceScatter(ParallelStyle):
    """Split a module's replicated input (first tensor argument, or ``kwarg``) into sequence
    shards: forward keeps this rank's chunk, backward all-gathers."""

    def __init__(self, *, sequence_dim: int = 1, kwarg: str = "hidden_states") -> None:
        super().__init__()
        self.sequence_dim = sequence_dim
        self.kwarg = kwarg

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        dim, kwarg = self.sequence_dim, self.kwarg

        def hook(_mod: nn.Module, args: tuple, kwargs: dict):
            x, where = _first_tensor_argument(args, kwargs, kwarg)
            if isinstance(x, DTensor):
                x = x.redistribute(device_mesh, [Replicate()]).to_local()
            _check_sequence(x, dim, device_mesh.size(), "sequence_scatter")
            x = DTensor.from_local(x, device_mesh, [Replicate()], run_check=False)
            x = x.redistribute(device_mesh, [Shard(dim)]).to_local()
            return _replace(args, kwargs, where, x)

        module.register_forward_pre_hook(hook, with_kwargs=True)
        return module
