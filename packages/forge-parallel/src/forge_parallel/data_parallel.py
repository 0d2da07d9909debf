"""Data parallelism with PyTorch's composable FSDP2 (``fully_shard``) and ``replicate``.

=========  ===============================================  ==================================
mode       what is sharded across the data-parallel ranks    implementation
=========  ===============================================  ==================================
``ddp``    nothing (gradients all-reduced)                  ``replicate`` (FSDP2-based DDP)
``zero1``  optimizer state                                  :class:`~forge_parallel.ZeroOptimizer`
``zero2``  optimizer state + gradients                      :class:`~forge_parallel.ZeroOptimizer`
``fsdp``   optimizer state + gradients + parameters         ``fully_shard`` on ``dp_shard_cp``
           (ZeRO-3)
``hsdp``   as ``fsdp`` within a replica group, replicated   ``fully_shard`` on the 2-D mesh
           across replica groups                            ``(dp_replicate, dp_shard_cp)``
=========  ===============================================  ==================================

ZeRO stages: Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models". FSDP: Zhao et al. 2023, "PyTorch FSDP: Experiences on Scaling Fully Sharded
Data Parallel". ``FSDPConfig(reshard_after_forward=False)`` keeps gathered parameters between
forward and backward, FSDP's take on ZeRO-2 (it still shards parameters between steps).

Context-parallel ranks hold the same parameters and see different tokens of the same
sequences, so FSDP shards over ``dp_shard x cp`` (also within each HSDP replica): its gradient
reduce-scatter then sums the ranks' partial gradients of each sequence.

Each block is its own FSDP unit (its all-gather and reduce-scatter overlap the neighbouring
blocks' compute), then the root takes the remaining parameters (embeddings, final norm, head).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import Shard

from forge_parallel.config import FSDPConfig
from forge_parallel.tp_styles import is_packed

__all__ = ["apply_ddp", "apply_fsdp", "mixed_precision_policy", "no_gradient_sync"]


def mixed_precision_policy(config: FSDPConfig) -> MixedPrecisionPolicy:
    return MixedPrecisionPolicy(param_dtype=config.param_dtype, reduce_dtype=config.reduce_dtype)


def _shard_placement(param: nn.Parameter) -> Shard | None:
    # A packed column-parallel weight is strided along dim 0 over the TP ranks; FSDP shards it
    # along its input dim instead so the composed placement still describes the full tensor.
    if is_packed(param):
        if param.ndim < 2:
            raise ValueError(
                "FSDP cannot shard a 1-D packed column-parallel parameter (the bias of a "
                "colwise_packed layer) consistently; drop the bias or use 'colwise' layers"
            )
        return Shard(param.ndim - 1)
    return None


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    config: FSDPConfig,
    blocks: Sequence[tuple[str, nn.Module]] = (),
    *,
    experts: Sequence[tuple[str, nn.Module]] = (),
    expert_mesh: DeviceMesh | None = None,
) -> dict[str, str]:
    """``fully_shard`` each block, then the root, on ``dp_mesh`` (1-D: FSDP; 2-D: HSDP).

    ``experts``: expert-parallel experts modules (``forge_parallel.expert_parallel``), sharded
    first, on ``expert_mesh`` (``mesh["edp"]``, or ``mesh["dp_replicate", "edp_shard"]`` for
    HSDP): the ranks holding the same experts. Their gradients are divided by the number of
    data ranks ``dp_mesh.size()``, like the dense ones, not by the size of ``expert_mesh``.

    Returns module name -> description for the summary.
    """
    if config.cpu_offload and dp_mesh.device_type == "cpu":
        raise ValueError(
            "cpu_offload=True moves sharded state from an accelerator to the CPU, but the mesh "
            "is already on the CPU; drop cpu_offload or build the mesh on an accelerator"
        )
    offload: OffloadPolicy = CPUOffloadPolicy() if config.cpu_offload else OffloadPolicy()
    kwargs = {
        "mesh": dp_mesh,
        "mp_policy": mixed_precision_policy(config),
        "offload_policy": offload,
        "shard_placement_fn": _shard_placement,
    }
    kind = "HSDP" if dp_mesh.ndim == 2 else "FSDP"
    applied: dict[str, str] = {}
    if experts and (expert_mesh is None or expert_mesh.ndim != dp_mesh.ndim):
        raise ValueError(
            f"expert-parallel experts need an expert_mesh with {dp_mesh.ndim} axes (mesh['edp'] "
            "for FSDP, mesh['dp_replicate', 'edp_shard'] for HSDP)"
        )
    for name, module in experts:
        expert_kwargs = {**kwargs, "mesh": expert_mesh}
        fully_shard(module, reshard_after_forward=config.reshard_after_forward, **expert_kwargs)
        module.set_gradient_divide_factor(float(dp_mesh.size()))
        # gloo has no PREMUL_SUM: reduce-scatter with SUM, then divide. (Not with one shard
        # rank: FSDP then skips the reduce-scatter and divides itself; forcing would divide twice.)
        if expert_mesh.device_type == "cpu" and expert_mesh.size(expert_mesh.ndim - 1) > 1:
            module.set_force_sum_reduction_for_comms(True)
        applied[name] = f"{kind} unit (experts, edp={expert_mesh.size()})"
    for name, block in blocks:
        fully_shard(block, reshard_after_forward=config.reshard_after_forward, **kwargs)
        applied[name] = f"{kind} unit"
    # The root's parameters are needed again right at the start of backward (the head).
    fully_shard(model, reshard_after_forward=config.reshard_after_forward, **kwargs)
    applied[""] = f"{kind} root"
    return applied


def apply_ddp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    config: FSDPConfig | None = None,
    blocks: Sequence[tuple[str, nn.Module]] = (),
) -> dict[str, str]:
    """Replicate ``model`` over the 1-D ``dp_mesh`` (DDP: gradients all-reduced, averaged).

    Uses PyTorch's FSDP2-based ``replicate``: each block is a gradient bucket whose all-reduce
    overlaps the backward of the blocks before it. ``config`` supplies the mixed-precision
    policy (``cpu_offload`` is not supported for DDP).
    """
    from torch.distributed._composable.replicate_with_fsdp import replicate

    config = config or FSDPConfig()
    if config.cpu_offload:
        raise ValueError("cpu_offload is an FSDP option; DDP keeps full replicas on the device")
    mp = mixed_precision_policy(config)
    applied: dict[str, str] = {}
    for name, block in blocks:
        replicate(block, mesh=dp_mesh, mp_policy=mp)
        applied[name] = "DDP bucket"
    replicate(model, mesh=dp_mesh, mp_policy=mp)
    applied[""] = "DDP root"
    return applied


def _fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module) -> Iterator[None]:
    """Skip the gradient reduction in the backward passes run inside (gradient accumulation).

    For FSDP / HSDP / DDP the unreduced gradients accumulate locally and are reduced by the
    first backward outside the block; with :class:`~forge_parallel.ZeroOptimizer` (and without
    data parallelism) gradients are reduced at the optimizer step anyway, so it is a no-op.
    """
    modules = _fsdp_modules(model)
    for m in modules:
        m.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for m in modules:
            m.set_requires_gradient_sync(True, recurse=False)
