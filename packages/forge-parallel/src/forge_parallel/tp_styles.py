"""Parallel styles that PyTorch's ``torch.distributed.tensor.parallel`` does not ship.

- :class:`PackedColwiseParallel`: a column-parallel ``nn.Linear`` whose output packs several
  equal sub-matrices, such as a fused SwiGLU ``gate_up_proj`` (``[gate; up]``). Plain
  column sharding would give rank 0 all of ``gate`` and rank 1 all of ``up``; here each rank holds
  ``[gate_r; up_r]``, so ``chunk(2, dim=-1)`` on its local output still separates gate and up.
  The weight is a DTensor with a ``_StridedShard(0, split_factor=chunks)`` placement, so
  ``full_tensor()`` and state dicts see the original, unpermuted layout. Unequal parts (Phi3's
  grouped-query ``qkv_proj``: ``[q; k; v]`` of 64, 32 and 32 rows) have no such placement; each
  rank computes its slice of every part from a replicated weight (see the class).
- :class:`BlockInput`: the shared input of a block's column-parallel projections; under
  sequence parallelism (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models") it all-gathers the sequence shards (the backward reduce-scatters).
- :class:`SequenceScatter`: split a replicated activation into sequence shards.
- :class:`SequenceShardingEmbedding`: a vocab-parallel embedding whose output is cut into
  sequence shards, after checking that the ids' length splits evenly over the ranks.
- :class:`ReplicateParallel`: weights replicated over the tensor-parallel ranks, the module run
  on its local input (an MoE router, experts and shared expert next to sequence-parallel
  layers); under sequence parallelism its weight gradients are summed over the ranks.
- :class:`GatheredInput`: a block whose own code mixes replicated and column-parallel layers
  (multi-head latent attention) gets its whole input as a plain tensor.
- :class:`ReduceGradient`: Megatron's ``f`` on a module's output: identity forward, gradient
  summed over the ranks in backward (a tensor every head shard reads, such as multi-head
  latent attention's shared rotary key).

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
from torch.distributed.tensor.parallel import ParallelStyle, RowwiseParallel
from torch.distributed.tensor.placement_types import _StridedShard

from forge_core.collectives import copy_to_group

__all__ = [
    "BlockInput",
    "GatheredInput",
    "PackedColwiseParallel",
    "ReduceGradient",
    "ReplicateParallel",
    "SequenceScatter",
    "SequenceShardingEmbedding",
    "is_packed",
]


def is_packed(param: torch.Tensor) -> bool:
    """Whether ``param`` is a DTensor sharded by :class:`PackedColwiseParallel`."""
    return isinstance(param, DTensor) and any(
        isinstance(p, _StridedShard) for p in param.placements
    )


def _packed_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    group = self._forge_tp_mesh
    if type(self).forward is not nn.Linear.forward:
        # A linear with arithmetic of its own (an FP8 linear, forge_kernels.fp8): as under
        # ColwiseParallel it gets a replicated DTensor input and the strided-sharded weight,
        # computes on the shards and returns a DTensor, here made local.
        if isinstance(x, DTensor):
            x = x.redistribute(x.device_mesh, [Replicate()] * x.device_mesh.ndim)
        else:  # its gradient, partial on each rank, is all-reduced (f) by from_local's backward
            x = DTensor.from_local(x, group, [Replicate()], run_check=False)
        y = type(self).forward(self, x)
        return y.to_local() if isinstance(y, DTensor) else y
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


def _unequal_packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """This rank's slice of every part, from the replicated weight: the rows it does not read
    get a zero gradient here, and the ``Partial`` gradient summed over tp is the whole one."""
    mesh = self._forge_tp_mesh
    if isinstance(x, DTensor):  # from BlockInput: its gradient here is a partial sum
        x = x.redistribute(x.device_mesh, [Replicate()] * x.device_mesh.ndim)
        x = x.to_local(grad_placements=[Partial()] * x.device_mesh.ndim)
    else:
        x = copy_to_group(x, group=mesh)  # f: identity forward, all-reduce backward
    rows = self._forge_packed_rows.to(x.device)
    weight = self.weight.to_local(grad_placements=[Partial()]).index_select(0, rows)
    bias = self.bias
    if bias is not None:
        bias = bias.to_local(grad_placements=[Partial()]).index_select(0, rows)
    return F.linear(x, weight, bias)


class PackedColwiseParallel(ParallelStyle):
    """Column parallelism for an ``nn.Linear`` whose output is stacked sub-matrices: ``chunks``
    equal ones, or ``parts`` of the given sizes (in output features).

    The output is local (each rank's ``[part_0_r; part_1_r; ...]``); the input is replicated.
    Equal parts shard the weight (a ``_StridedShard`` placement). Unequal parts cannot be
    described by a DTensor placement (a rank's rows are a slice of each part, at different
    strides), and a permuted layout would leak into ``full_tensor()`` and checkpoints; so that
    weight stays replicated (its memory does not shrink with tp) while each rank computes only
    its slice of every part, and its gradient is a ``Partial()`` sum over tp, reduced like a
    ``replicate_partial`` norm's.
    """

    def __init__(self, chunks: int = 2, *, parts: tuple[int, ...] | None = None) -> None:
        super().__init__()
        if parts is not None:
            parts = tuple(int(p) for p in parts)
            if len(parts) < 2 or min(parts) < 1:
                raise ValueError(f"parts must be two or more positive sizes, got {parts}")
            chunks = len(parts)
        if chunks < 1:
            raise ValueError(f"chunks must be >= 1, got {chunks}")
        self.chunks = chunks
        self.parts = None if parts is None or len(set(parts)) == 1 else parts

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, nn.Linear):
            raise ValueError(f"colwise_packed applies to nn.Linear, got {type(module).__name__}")
        if self.parts is not None:
            return self._apply_unequal(module, device_mesh)
        placement = _StridedShard(0, split_factor=self.chunks)
        for name, param in list(module.named_parameters(recurse=False)):
            sharded = distribute_tensor(param.detach(), device_mesh, [placement])
            module.register_parameter(
                name, nn.Parameter(sharded, requires_grad=param.requires_grad)
            )
        module._forge_tp_mesh = device_mesh
        module.forward = types.MethodType(_packed_linear_forward, module)
        return module

    def _apply_unequal(self, module: nn.Linear, device_mesh: DeviceMesh) -> nn.Module:
        parts, tp = self.parts, device_mesh.size()
        if sum(parts) != module.out_features or any(p % tp for p in parts):
            raise ValueError(
                f"colwise_packed parts {list(parts)} must sum to out_features="
                f"{module.out_features} and each be divisible by tp={tp}"
            )
        if type(module).forward is not nn.Linear.forward:
            raise ValueError(
                f"colwise_packed with unequal parts needs a plain nn.Linear, got "
                f"{type(module).__name__} with a forward of its own (e.g. an FP8 linear)"
            )
        rank, starts = device_mesh.get_local_rank(), [0]
        for p in parts[:-1]:
            starts.append(starts[-1] + p)
        rows = torch.cat(
            [torch.arange(s + rank * (p // tp), s + (rank + 1) * (p // tp)) for s, p in
             zip(starts, parts, strict=True)]
        )  # fmt: skip
        for name, param in list(module.named_parameters(recurse=False)):
            replicated = distribute_tensor(param.detach(), device_mesh, [Replicate()])
            module.register_parameter(
                name, nn.Parameter(replicated, requires_grad=param.requires_grad)
            )
        module._forge_tp_mesh = device_mesh
        module._forge_packed_rows = rows
        module.forward = types.MethodType(_unequal_packed_forward, module)
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


class SequenceShardingEmbedding(RowwiseParallel):
    """A vocab-parallel embedding (``RowwiseParallel`` on ``nn.Embedding``: vocabulary rows
    sharded, partial lookups summed) whose output is reduce-scattered into sequence shards
    (``Shard(sequence_dim)``): where sequence parallelism first cuts the sequence (Korthikanti
    et al. 2022).

    The ids' sequence length is checked first: an uneven cut would give the ranks shards of
    different lengths, and the first sequence all-gather after it (a :class:`BlockInput`) would
    disagree on sizes (an abort on gloo, a hang or garbage on NCCL). Only here is the whole
    length known without a collective; the check is a shape comparison.
    """

    def __init__(self, *, sequence_dim: int = 1) -> None:
        super().__init__(input_layouts=Replicate(), output_layouts=Shard(sequence_dim))
        self.sequence_dim = sequence_dim

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        module = super()._apply(module, device_mesh)
        dim, size = self.sequence_dim, device_mesh.size()

        def check(_mod: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor) and args[0].ndim > dim:
                _check_sequence(args[0], dim, size, "vocab_parallel_embedding")

        module.register_forward_pre_hook(check, prepend=True)
        return module


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


class GatheredInput(BlockInput):
    """The input (first tensor argument, or ``kwarg``) of a block that runs replicated layers
    on it, as a plain tensor of the whole sequence: all-gathered from sequence shards under
    sequence parallelism (the backward keeps this rank's chunk of the gradient), untouched
    without.

    For a block such as multi-head latent attention (DeepSeek-V2, arXiv:2405.04434), whose
    latent down-projections are replicated and feed column-parallel up-projections: those take
    the plain latent as a replicated input and reduce its gradient themselves (Megatron's
    ``f``), and a latent every head reads directly gets a :class:`ReduceGradient`. The block's
    input gradient is then whole on every rank, which is what the backward here assumes (a
    :class:`BlockInput` would sum it over the ranks once more).
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        dim, kwarg, sp = self.sequence_dim, self.kwarg, self.sequence_parallel

        def hook(_mod: nn.Module, args: tuple, kwargs: dict):
            x, where = _first_tensor_argument(args, kwargs, kwarg)
            if isinstance(x, DTensor):
                raise ValueError(
                    f"gathered_input: {type(_mod).__name__} received a DTensor "
                    f"({x.placements}); it expects the plain activations between blocks"
                )
            if not sp:
                return None
            x = DTensor.from_local(x, device_mesh, [Shard(dim)], run_check=False)
            x = x.redistribute(device_mesh, [Replicate()]).to_local(grad_placements=[Replicate()])
            return _replace(args, kwargs, where, x)

        module.register_forward_pre_hook(hook, with_kwargs=True)
        return module


class ReduceGradient(ParallelStyle):
    """Megatron's ``f`` (``copy_to_tensor_model_parallel_region``, Shoeybi et al. 2019) on the
    module's output: identity in forward, gradient all-reduced over the ranks in backward.

    For a replicated tensor that each rank consumes only in part, so that each rank's gradient
    is a partial sum: multi-head latent attention's rotary key, shared by all heads while each
    rank holds some of the heads. The module (typically an ``nn.Identity`` the model names for
    the purpose) must return one tensor."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if device_mesh.ndim != 1:
            raise ValueError(f"reduce_grad needs a 1-D mesh, got {device_mesh.ndim} dimensions")
        group = device_mesh.get_group()

        def hook(_mod: nn.Module, _args: tuple, output: Any) -> torch.Tensor:
            if not isinstance(output, torch.Tensor) or isinstance(output, DTensor):
                raise ValueError(
                    f"reduce_grad: {type(_mod).__name__} must return one plain tensor, got "
                    f"{type(output).__name__}"
                )
            return copy_to_group(output, group=group)

        module.register_forward_hook(hook)
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


class ReplicateParallel(ParallelStyle):
    """Every parameter of the module (and of its submodules) replicated over the mesh, the
    module computing on its local inputs with the local copies of its weights.

    For modules that tensor parallelism does not split but that sit between sequence-parallel
    layers, such as a mixture-of-experts block (router, routed experts, shared expert): with
    ``sequence_parallel=True`` each rank runs the module on its own sequence shard, as
    Megatron-LM runs MoE layers with sequence parallelism and expert-tensor-parallel size 1
    (Korthikanti et al. 2022; Megatron-Core ``moe``), so each rank's weight gradient is the
    partial sum over its tokens. The weights are ``Replicate()`` DTensors whose gradients are
    marked ``Partial()``: gradient alignment (clipping) or FSDP sums them over the
    tensor-parallel ranks, like the gradients of sequence-parallel norms. Without sequence
    parallelism every rank computes the same thing on the same replicated input, and the
    gradients are ``Replicate()``.

    The module must receive plain tensors (the activations between blocks); a DTensor input
    raises, because its layout would decide which gradient is right (a replicated output
    consumed by head-sharded layers, as multi-head latent attention's shared rotary key, has a
    partial gradient that a local tensor would not reduce).
    """

    def __init__(self, *, sequence_parallel: bool, name: str | None = None) -> None:
        super().__init__()
        self.sequence_parallel = sequence_parallel
        self.name = name  # the module's path, for error messages

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        what = f"{self.name} ({type(module).__name__})" if self.name else type(module).__name__
        own_weight = module._parameters.get("weight")
        # A norm-like module (its own weight 1-D) scales the input's last dimension, so the two
        # must agree; a mismatch means the module sits behind a column-parallel projection and
        # normalizes over features that tensor parallelism splits (OLMo2's q_norm / k_norm over
        # all heads x head_dim): on this rank's slice it would compute something else.
        norm_size = own_weight.numel() if own_weight is not None and own_weight.dim() == 1 else None
        for owner_name, owner in module.named_modules():
            for name, param in list(owner.named_parameters(recurse=False)):
                if isinstance(param, DTensor):
                    where = f"{owner_name}.{name}" if owner_name else name
                    raise ValueError(
                        f"replicate: parameter {where} of {type(module).__name__} is already "
                        f"distributed ({param.placements}); give its module one style only"
                    )
                replicated = distribute_tensor(param.detach(), device_mesh, [Replicate()])
                owner.register_parameter(
                    name, nn.Parameter(replicated, requires_grad=param.requires_grad)
                )
        grad_placements = [Partial() if self.sequence_parallel else Replicate()]
        saved: list[tuple[nn.Module, str, torch.Tensor]] = []

        def use_local_weights(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            restore_weights()  # after a forward that raised, its post-hook did not run
            for value in (*args, *kwargs.values()):
                if isinstance(value, DTensor):
                    raise ValueError(
                        f"replicate: {what} received a DTensor input "
                        f"({value.placements}); it runs on local tensors: do not put it under "
                        "a 'block_input' (or another style that hands it a DTensor)"
                    )
            first = next(
                (v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None
            )
            if norm_size is not None and first is not None and first.shape[-1] != norm_size:
                raise ValueError(
                    f"replicate: {what} has a weight of {norm_size} features but its input "
                    f"has {first.shape[-1]} in its last dimension (tp={device_mesh.size()}): it "
                    "normalizes over features that a column-parallel projection before it "
                    "splits (e.g. OLMo2's q_norm / k_norm over all heads), so it cannot run on "
                    "one rank's slice, and no tensor-parallel style shards such a norm yet. "
                    "Train this model without tensor parallelism or, without sequence "
                    "parallelism, keep the block that holds it whole ('replicate' on the "
                    "attention block, no styles inside it)"
                )
            for owner in mod.modules():
                for name, param in owner._parameters.items():
                    if isinstance(param, DTensor):
                        saved.append((owner, name, param))
                        owner._parameters[name] = param.to_local(grad_placements=grad_placements)

        def restore_weights(*_args: Any) -> None:
            while saved:
                owner, name, param = saved.pop()
                owner._parameters[name] = param

        # Not ``always_call``: dynamo guards on such a hook's identity, so each block of a
        # regionally compiled model (one graph for all) would compile again.
        module.register_forward_pre_hook(use_local_weights, with_kwargs=True)
        module.register_forward_hook(restore_weights)
        return module
