"""Tensor parallelism for a low-rank adapter around a linear layer (LoRA, Hu et al. 2021,
arXiv:2106.09685), as Megatron-Bridge / NeMo's ``ParallelLinearAdapter`` splits it.

The wrapper holds the frozen ``nn.Linear`` (``base``) and two adapter matrices, ``down``
``[r, in]`` and ``up`` ``[out, r]``, and computes ``base(x) + up(down(x))`` (any scaling or
dropout in between is the wrapper's own business: this style only needs the update to be
linear in the two matrices' products). The three parameters are placed relative to the
base's split (Shoeybi et al. 2019, "Megatron-LM"):

- column-parallel base (output features sharded, ``colwise`` or ``colwise_packed:N``): ``down``
  replicated (its input is the whole activation; its gradient, from this rank's output
  features only, is a partial sum over the ranks), ``up`` split on dim 0 exactly like the base
  weight (a packed ``[gate; up]`` base's ``_StridedShard`` included), so each rank's update is
  its slice of the output features;
- row-parallel base (input features sharded, ``rowwise``): ``down`` split on dim 1 like the
  base weight, ``up`` replicated: each rank's update is a partial sum, added to the base's
  partial output before the one all-reduce (reduce-scatter under sequence parallelism), which
  is exact because both are linear; the base's bias is added once, after the reduction.

The wrapper runs on local tensors (its forward is plain PyTorch); the style turns its input
into the local one the base's style would see, hands it the local shards of the four
parameters with the gradient layout each has, and turns the output into the layout the base's
style would return. The input of a column-parallel wrapper is the block's replicated DTensor
(``block_input``, which under sequence parallelism gathered the sequence: the adapter sees the
same whole input as the base), or a plain replicated tensor (Megatron's ``f``).

A base whose class overrides ``nn.Linear.forward`` (forge_kernels' ``Fp8Linear``) is not run on
plain local shards: it keeps its ``DTensor`` parameters and gets its input as the ``DTensor``
its own style would hand it (``Replicate()`` column-parallel, ``Shard(-1)`` row-parallel), its
output taken back to the local tensor; so it computes what it computes under that style (an
FP8 linear then reduces its per-tensor amaxes over the tensor-parallel ranks, as one process
takes them over the whole tensors). A plain ``nn.Linear`` runs on its local shards.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import (
    DTensor,
    Partial,
    Placement,
    Replicate,
    Shard,
    distribute_tensor,
)
from torch.distributed.tensor.parallel import ParallelStyle
from torch.distributed.tensor.placement_types import _StridedShard

from forge_core.collectives import copy_to_group

__all__ = ["LinearAdapterParallel"]


class LinearAdapterParallel(ParallelStyle):
    """Split a wrapper of an ``nn.Linear`` (attribute ``base``) with a low-rank update
    (parameters ``down`` ``[r, in]`` and ``up`` ``[out, r]`` of the wrapper itself) as the
    base would be split by ``layout``: ``"colwise"`` (``chunks`` > 1: ``colwise_packed:N``) or
    ``"rowwise"`` (output replicated, or sequence-sharded on ``sequence_dim`` with
    ``sequence_parallel``). See the module docstring for the placements."""

    def __init__(
        self,
        layout: Literal["colwise", "rowwise"],
        *,
        chunks: int = 1,
        sequence_parallel: bool = False,
        sequence_dim: int = 1,
        base: str = "base",
        down: str = "lora_A",
        up: str = "lora_B",
    ) -> None:
        super().__init__()
        if layout not in ("colwise", "rowwise"):
            raise ValueError(f"layout must be 'colwise' or 'rowwise', got {layout!r}")
        if chunks < 1 or (layout == "rowwise" and chunks != 1):
            raise ValueError(f"chunks must be >= 1 (and 1 for rowwise), got {chunks}")
        self.layout, self.chunks = layout, chunks
        self.sequence_parallel, self.sequence_dim = sequence_parallel, sequence_dim
        self.base_name, self.down_name, self.up_name = base, down, up

    def _placements(self) -> dict[str, tuple[Placement, Placement]]:
        """Parameter role -> (placement, placement of its local gradient)."""
        if self.layout == "colwise":
            split = Shard(0) if self.chunks == 1 else _StridedShard(0, split_factor=self.chunks)
            return {
                "weight": (split, split),
                "bias": (split, split),
                "down": (Replicate(), Partial()),  # from this rank's output features only
                "up": (split, split),
            }
        return {
            "weight": (Shard(1), Shard(1)),
            "bias": (Replicate(), Partial() if self.sequence_parallel else Replicate()),
            "down": (Shard(1), Shard(1)),
            "up": (Replicate(), Partial()),  # its input is this rank's partial sum
        }

    def _owners(self, module: nn.Module) -> dict[str, tuple[nn.Module, str]]:
        """Parameter role -> (owning module, attribute name), with the shapes checked."""
        what = type(module).__name__
        base = getattr(module, self.base_name, None)
        if not isinstance(base, nn.Linear):
            raise ValueError(
                f"linear adapter style: {what}.{self.base_name} must be an nn.Linear (the "
                f"adapted layer), got {type(base).__name__}"
            )
        for name in (self.down_name, self.up_name):
            if not isinstance(module._parameters.get(name), torch.Tensor):
                raise ValueError(f"linear adapter style: {what} has no parameter {name!r}")
        down, up = module._parameters[self.down_name], module._parameters[self.up_name]
        if down.shape[1] != base.in_features or up.shape[0] != base.out_features:
            raise ValueError(
                f"linear adapter style: {what}.{self.down_name} {tuple(down.shape)} must be "
                f"[rank, {base.in_features}] and {self.up_name} {tuple(up.shape)} "
                f"[{base.out_features}, rank] for {self.base_name} {base}"
            )
        known = {f"{self.base_name}.weight", f"{self.base_name}.bias", self.down_name, self.up_name}
        for name, _ in module.named_parameters():
            if name not in known:
                raise ValueError(
                    f"linear adapter style: {what} has a parameter {name!r} the style does not "
                    f"place; it splits only {sorted(known)}"
                )
        owners = {
            "weight": (base, "weight"),
            "down": (module, self.down_name),
            "up": (module, self.up_name),
        }
        if base.bias is not None:
            owners["bias"] = (base, "bias")
        return owners

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if device_mesh.ndim != 1:
            raise ValueError(f"linear adapter style needs a 1-D mesh, got {device_mesh.ndim}-D")
        owners = self._owners(module)
        placements = self._placements()
        for role, (owner, name) in owners.items():
            param = owner._parameters[name]
            if isinstance(param, DTensor):
                raise ValueError(
                    f"linear adapter style: {type(module).__name__} parameter {role} is already "
                    f"distributed ({param.placements}); give the wrapper one style only"
                )
            placed = distribute_tensor(param.detach(), device_mesh, [placements[role][0]])
            owner.register_parameter(name, nn.Parameter(placed, requires_grad=param.requires_grad))
        rowwise, sp, dim = self.layout == "rowwise", self.sequence_parallel, self.sequence_dim
        group = device_mesh.get_group()
        base = owners["weight"][0]
        on_dtensors = type(base).forward is not nn.Linear.forward  # see the module docstring
        if on_dtensors:
            _run_base_on_dtensors(base, device_mesh, rowwise=rowwise)
        saved: list[tuple[nn.Module, str, torch.Tensor]] = []
        bias_held: list[torch.Tensor] = []  # a row-parallel bias, added after the reduction

        def local_input(x: torch.Tensor) -> torch.Tensor:
            if rowwise:  # this rank's input features
                if isinstance(x, DTensor):
                    x = x.redistribute(device_mesh, [Shard(x.ndim - 1)]).to_local()
                return x
            if isinstance(x, DTensor):  # replicated: its gradient here is a partial sum
                x = x.redistribute(device_mesh, [Replicate()])
                return x.to_local(grad_placements=[Partial()])
            return copy_to_group(x, group=group)  # f: identity forward, all-reduce backward

        def restore() -> None:
            while saved:
                owner, name, param = saved.pop()
                owner._parameters[name] = param

        def pre_hook(mod: nn.Module, args: tuple, kwargs: dict):
            restore()  # after a forward that raised, the post-hook did not run
            bias_held.clear()
            if args and isinstance(args[0], torch.Tensor):
                args = (local_input(args[0]), *args[1:])
            else:
                raise ValueError(
                    f"linear adapter style: {type(mod).__name__} must get its input as the "
                    "first positional argument"
                )
            for role, (owner, name) in owners.items():
                param = owner._parameters[name]
                saved.append((owner, name, param))
                if rowwise and role == "bias":
                    owner._parameters[name] = None
                    bias_held.append(param)
                    continue
                if on_dtensors and owner is base:
                    continue
                grad_layout = placements[role][1]
                owner._parameters[name] = param.to_local(grad_placements=[grad_layout])
            return args, kwargs

        def post_hook(_mod: nn.Module, _args: tuple, output: Any):
            restore()
            bias = bias_held.pop() if bias_held else None
            if not rowwise or not isinstance(output, torch.Tensor):
                return None
            layout = Shard(dim) if sp else Replicate()
            output = DTensor.from_local(output, device_mesh, [Partial()], run_check=False)
            output = output.redistribute(device_mesh, [layout]).to_local()
            if bias is not None:
                output = output + bias.to_local(grad_placements=[placements["bias"][1]])
            return output

        # Not ``always_call``: dynamo guards on such a hook's identity, so each block of a
        # regionally compiled model would compile again.
        module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        module.register_forward_hook(post_hook)
        return module


def _run_base_on_dtensors(base: nn.Module, mesh: DeviceMesh, *, rowwise: bool) -> None:
    """Hooks that hand ``base`` (with ``DTensor`` parameters) the wrapper's local input as the
    ``DTensor`` its own style would give it and return its output as the local tensor the
    wrapper adds the update to. Column-parallel: the input is replicated and its gradient a
    partial sum (kept partial: the wrapper's input reduces it once, with the adapter's);
    row-parallel: the input holds this rank's features and the output is a partial sum (its
    gradient the replicated output gradient)."""

    def pre_hook(_mod: nn.Module, args: tuple):
        x = args[0]
        if rowwise:
            x = DTensor.from_local(x, mesh, [Shard(x.ndim - 1)], run_check=False)
        else:
            x = DTensor.from_local(
                x, mesh, [Replicate()], run_check=False, grad_placements=[Partial()]
            )
        return (x, *args[1:])

    def post_hook(_mod: nn.Module, _args: tuple, output: Any):
        if not isinstance(output, DTensor):
            raise ValueError(
                f"linear adapter style: {type(base).__name__} with DTensor parameters returned "
                f"a {type(output).__name__}, not a DTensor; its forward must run on DTensors"
            )
        if rowwise:
            return output.to_local(grad_placements=[Replicate()])
        return output.to_local()

    base.register_forward_pre_hook(pre_hook)
    base.register_forward_hook(post_hook)
