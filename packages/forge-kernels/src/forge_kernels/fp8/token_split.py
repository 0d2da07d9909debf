"""FP8 linears whose tokens are split over ranks: each rank scales as one process would.

Context parallelism gives every rank a shard of each sequence, and sequence parallelism runs
some layers whole on each rank's sequence shard (a mixture-of-experts block's shared expert,
multi-token prediction's ``eh_proj``). Such a layer's input ``x`` and output gradient ``dy``
are then row (token) shards of one process's tensors, while its weight is whole. Per-tensor
scaling (current or delayed) takes the amax of the whole tensor, so the amaxes of ``x`` and
``dy`` are all-reduced (max) over the group that splits the tokens: every rank casts with one
process's scale, its GEMMs give one process's rows of the output and of the input gradient, and
its weight gradient is its tokens' share of one process's sum (the data-parallel reduction over
those ranks adds the shares). Delayed scaling records the reduced amax, so every rank keeps
one process's histories. This is the tensor-parallel amax reduction of
:mod:`forge_kernels.fp8.tensor_parallel` applied along the token dimension; Transformer Engine
reduces amaxes over its ``amax_reduction_group`` (data, tensor and context parallel ranks) for
the same reason.

Block-wise scaling (DeepSeek-V3, arXiv:2412.19437 section 3.3) needs no reduction: the forward
and input-gradient GEMMs scale 1x128 tiles of one token each. The weight-gradient GEMM
contracts over tokens and quantizes ``x`` and ``dy`` in 128x1 blocks of 128 consecutive tokens,
so it gives one process's values when each rank's tokens are runs of whole blocks: runs whose
lengths (and starts in the whole sequence) are multiples of the block size.
:func:`check_token_blocks` checks the local count; the caller that splits the sequence knows
the runs (forge-train checks them from the context-parallel chunk size).

Tell a layer its token group with ``Fp8Linear(token_group=...)`` or, after parallelization,
:func:`set_token_group`. Several groups (a tuple) mean the tokens are split over their product
(context parallel x sequence parallel): the amax is reduced over each in turn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from forge_kernels.fp8.quantize import AmaxGroup

__all__ = ["check_token_blocks", "set_token_group", "token_group_size"]


def token_group_size(group: AmaxGroup) -> int:
    """How many ranks share the tokens: the product of the groups' sizes (1 for ``None``)."""
    if group is None:
        return 1
    import torch.distributed as dist

    size = 1
    for one in group if isinstance(group, tuple | list) else (group,):
        size *= dist.get_world_size(one)
    return size


def check_token_blocks(x: torch.Tensor, block_size: int) -> None:
    """``ValueError`` unless this rank's token count is a multiple of the block size (else a
    128x1 weight-gradient block would hold tokens of two ranks)."""
    tokens = x.numel() // max(x.shape[-1], 1) if x.dim() else 0
    if tokens % block_size:
        raise ValueError(
            f"block-wise FP8 scaling with tokens split over ranks: this rank holds {tokens} "
            f"tokens, not a multiple of the {block_size}-token blocks the weight-gradient GEMM "
            f"quantizes, so a block would mix two ranks' tokens; split the sequence into runs of "
            f"multiples of {block_size} tokens, or use per-tensor scaling"
        )


def set_token_group(
    model: nn.Module, group: AmaxGroup, *, names: list[str] | None = None
) -> list[str]:
    """Set ``token_group`` on the :class:`~forge_kernels.fp8.linear.Fp8Linear` modules of
    ``model`` (all of them, or those whose qualified names are in ``names``); returns the names
    set. ``None`` clears it. ``ValueError`` naming the missing ones if ``names`` holds a name
    that is not an FP8 linear of ``model``."""
    from forge_kernels.fp8.linear import Fp8Linear

    layers = {name: m for name, m in model.named_modules() if isinstance(m, Fp8Linear)}
    if names is not None:
        missing = sorted(set(names) - set(layers))
        if missing:
            raise ValueError(
                f"set_token_group: {missing} are not Fp8Linear modules of the model; pass the "
                "qualified names of its FP8 linears (model.named_modules())"
            )
        layers = {name: layers[name] for name in names}
    for layer in layers.values():
        layer.token_group = group
    return list(layers)
