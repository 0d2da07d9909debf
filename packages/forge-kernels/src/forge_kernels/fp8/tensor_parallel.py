"""FP8 linears under tensor parallelism: the GEMMs on each rank's shards, scaled as one process.

Tensor-parallel styles (torch's ``ColwiseParallel`` / ``RowwiseParallel``, forge-parallel's
packed column style) make a linear's weight a DTensor on the 1-D tensor-parallel mesh and hand
its forward a DTensor input. :class:`~forge_kernels.fp8.linear.Fp8Linear` then runs
:func:`linear_on_shards`, which computes on the local shards (Megatron-LM's column- and
row-parallel GEMMs, Shoeybi et al. 2019) and returns the DTensor the style expects:

==========================  =================  ==============  ===============================
weight placement            input              output          amax reduced over tp (max)
==========================  =================  ==============  ===============================
``Shard(0)`` (column)       ``Replicate()``    ``Shard(-1)``   weight, output gradient
``_StridedShard(0, N)``     ``Replicate()``    same, strided   weight, output gradient
``Shard(1)`` (row)          ``Shard(-1)``      ``Partial()``   weight, input
``Replicate()``             ``Replicate()``    ``Replicate()`` none
==========================  =================  ==============  ===============================

Per-tensor scaling (current or delayed) takes the amax of the *whole* tensor, so the amax of
every sharded operand is all-reduced over the group (:class:`~forge_kernels.fp8.quantize.
Fp8AmaxGroups`): each rank casts with the scale one process computes, and its GEMM on its
shards gives one process's values (up to fp32 summation order). Transformer Engine reduces
amaxes over the tensor-parallel group for the same reason; torchao takes amax of DTensors.
Delayed scaling records the reduced amax, so the histories stay one process's. When the
tokens are split as well (context parallelism), ``token_group`` adds that group to the input
and output-gradient reductions (:mod:`forge_kernels.fp8.token_split`).

Block-wise scaling (DeepSeek-V3 1x128 activation tiles, 128x128 weight blocks) needs no
reduction when every block lies in one shard, that is when the sharded dimension of every
shard is a multiple of the block size; otherwise a block would straddle two ranks and this
raises (the fix-it names the sizes).

The input of a column-parallel layer is replicated and its local gradient a partial sum
(marked ``Partial()``: the style's input redistribution reduces it, Megatron's ``f``). A
row-parallel bias is added on tensor-parallel rank 0 only, so the partial outputs sum to one
bias; its gradient, the sum of the replicated output gradient, is computed on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from forge_kernels.fp8.quantize import Fp8AmaxGroups

if TYPE_CHECKING:
    from forge_kernels.fp8.quantize import AmaxGroup

__all__ = ["linear_on_shards", "weight_split"]

LocalLinear = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor | None, Fp8AmaxGroups | None], torch.Tensor
]


def weight_split(placement: Placement) -> str:
    """``"out"`` (output features sharded: column parallel, plain or packed), ``"in"`` (input
    features sharded: row parallel) or ``"replicated"``, from a weight's placement."""
    if isinstance(placement, _StridedShard):
        if placement.dim in (0, -2):
            return "out"
    elif isinstance(placement, Shard):
        if placement.dim in (0, -2):
            return "out"
        if placement.dim in (1, -1):
            return "in"
    elif isinstance(placement, Replicate):
        return "replicated"
    raise ValueError(
        f"an FP8 linear's weight must be sharded on dim 0 (column parallel), dim 1 (row "
        f"parallel) or replicated over the tensor-parallel mesh, got {placement}"
    )


def _output_placement(weight_placement: Placement, split: str, ndim: int) -> Placement:
    if split == "in":
        return Partial()
    if split == "replicated":
        return Replicate()
    if isinstance(weight_placement, _StridedShard):  # packed [part_0_r; part_1_r; ...]
        return _StridedShard(ndim - 1, split_factor=weight_placement.split_factor)
    return Shard(ndim - 1)


def _is_last_dim_shard(placement: Placement, ndim: int) -> bool:
    return (
        isinstance(placement, Shard)
        and not isinstance(placement, _StridedShard)
        and placement.dim in (-1, ndim - 1)
    )


def _check_blocks(weight: DTensor, split: str, block_size: int, tp: int) -> None:
    """Every 1 x block / block x block tile of a sharded dim must lie within one shard."""
    if split == "replicated":
        return
    dim = 0 if split == "out" else 1
    size = weight.shape[dim]
    chunks = (
        weight.placements[0].split_factor
        if split == "out" and isinstance(weight.placements[0], _StridedShard)
        else 1
    )
    local = size // (chunks * tp)
    if size % (chunks * tp) or local % block_size:
        what = "out_features" if split == "out" else "in_features"
        packed = f" in {chunks} packed parts" if chunks > 1 else ""
        raise ValueError(
            f"block-wise FP8 scaling under tensor parallelism: {what}={size}{packed} split over "
            f"tp={tp} gives {local}-wide shards, not a multiple of the {block_size}-wide blocks, "
            f"so a scaling block would straddle two ranks; use a tp degree that leaves "
            f"multiples of {block_size} per rank, per-tensor scaling, or keep this layer out of "
            "FP8"
        )


def linear_on_shards(
    x: torch.Tensor,
    weight: DTensor,
    bias: torch.Tensor | None,
    *,
    linear: LocalLinear,
    block_size: int | None = None,
    token_group: AmaxGroup = None,
) -> DTensor:
    """``linear(x_local, weight_local, bias_local, amax_groups)`` on the local shards of a
    tensor-parallel linear, returned as the DTensor the layer's style expects (see the module
    docstring). ``block_size``: the block-wise recipe's block, checked against the shards.
    ``token_group``: the group(s) splitting the tokens as well (context parallelism), over which
    the input and output-gradient amaxes are reduced too (:mod:`forge_kernels.fp8.token_split`)."""
    mesh = weight.device_mesh
    if mesh.ndim != 1:
        raise ValueError(
            f"an FP8 linear's DTensor weight must live on the 1-D tensor-parallel mesh, got a "
            f"{mesh.ndim}-D mesh {mesh}; apply tensor parallelism before data parallelism"
        )
    (placement,) = weight.placements
    split = weight_split(placement)
    if not isinstance(x, DTensor) or x.device_mesh != mesh:
        raise ValueError(
            f"an FP8 linear with a {placement} weight needs its input as a DTensor on the same "
            f"mesh (as the tensor-parallel styles hand it), got {type(x).__name__}"
            + (f" on {x.device_mesh}" if isinstance(x, DTensor) else "")
        )
    (x_placement,) = x.placements
    x_sharded = _is_last_dim_shard(x_placement, x.ndim)
    if x_sharded != (split == "in") or not (x_sharded or isinstance(x_placement, Replicate)):
        expected = "Shard(-1)" if split == "in" else "Replicate()"
        raise ValueError(
            f"an FP8 linear with a {placement} weight needs a {expected} input, got "
            f"{x_placement}; redistribute the input first (the tensor-parallel styles do)"
        )
    tp = mesh.size()
    if block_size is not None:
        _check_blocks(weight, split, block_size, tp)
    group = mesh.get_group()
    # A replicated input of a column-parallel layer gets a partial gradient on each rank.
    x_local = x.to_local(grad_placements=[Partial()] if split == "out" else None)
    w_local = weight.to_local()
    b_local = None
    if bias is not None:
        if not isinstance(bias, DTensor):
            raise ValueError("an FP8 linear with a DTensor weight needs a DTensor bias (or none)")
        b_local = bias.to_local()
    groups = Fp8AmaxGroups(
        input=group if split == "in" else None,
        weight=None if split == "replicated" else group,
        grad=group if split == "out" else None,
        tokens=token_group,
    )
    if split == "in":
        y_local = linear(x_local, w_local, None, groups)  # a partial sum
        if b_local is not None:
            y_local = _AddBiasOnFirstRank.apply(y_local, b_local, mesh.get_local_rank() == 0)
    else:
        y_local = linear(x_local, w_local, b_local, groups)
    shape = torch.Size((*x.shape[:-1], weight.shape[0]))
    return DTensor.from_local(
        y_local,
        mesh,
        [_output_placement(placement, split, y_local.ndim)],
        run_check=False,
        shape=shape,
        stride=_contiguous_stride(shape),
    )


class _AddBiasOnFirstRank(torch.autograd.Function):
    """``y + bias`` on the first rank, ``y`` elsewhere (the partial sums then hold one bias);
    the bias gradient, from the replicated output gradient, is the same on every rank."""

    @staticmethod
    def forward(ctx, y, bias, first):
        ctx.bias_dtype = bias.dtype
        return y + bias.to(y.dtype) if first else y.clone()

    @staticmethod
    def backward(ctx, dy):
        db = dy.reshape(-1, dy.shape[-1]).float().sum(0).to(ctx.bias_dtype)
        return dy, db, None


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, running = [], 1
    for size in reversed(shape):
        stride.append(running)
        running *= max(size, 1)
    return tuple(reversed(stride))
