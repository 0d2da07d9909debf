"""Keyword-only configuration of each parallel dimension, validated when constructed.

Each dataclass configures one ``apply_*`` helper; :func:`forge_parallel.parallelize` takes them
as keyword arguments. The tensor-parallel plan (:class:`~forge_parallel.TPPlan`) lives beside
the code that applies it, in :mod:`forge_parallel.tensor_parallel`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "DATA_PARALLEL_MODES",
    "CompileConfig",
    "FSDPConfig",
    "OffloadConfig",
    "RecomputeConfig",
]

#: Accepted values of ``parallelize(data_parallel=...)`` besides ``"auto"`` and ``None``.
DATA_PARALLEL_MODES = ("fsdp", "hsdp", "ddp", "zero1", "zero2")

_SELECTIVE_PRESETS = ("attention", "pointwise")


@dataclass(frozen=True, kw_only=True)
class FSDPConfig:
    """Sharded (FSDP2 / ZeRO-3) and replicated (DDP) data parallelism settings.

    ``param_dtype`` is the dtype parameters are all-gathered to and computed in (``None``: keep
    the parameters' own dtype); the sharded parameters, and so the optimizer's master weights,
    stay in their original dtype (float32). ``reduce_dtype`` is the dtype gradients are
    reduced in (float32 by default, even for bf16 compute). ``reshard_after_forward=False``
    keeps the gathered parameters from forward to backward (FSDP's ``SHARD_GRAD_OP``, the
    communication pattern of ZeRO-2). ``cpu_offload`` keeps the sharded parameters, gradients
    and optimizer step on the CPU (needs an accelerator mesh: it is pointless on a CPU mesh).
    """

    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = torch.float32
    reshard_after_forward: bool = True
    cpu_offload: bool = False

    def __post_init__(self) -> None:
        for name in ("param_dtype", "reduce_dtype"):
            value = getattr(self, name)
            if value is not None and not (
                isinstance(value, torch.dtype) and value.is_floating_point
            ):
                raise ValueError(
                    f"{name} must be a floating-point torch.dtype or None, got {value!r}"
                )
        if not isinstance(self.reshard_after_forward, bool):
            raise ValueError(
                f"reshard_after_forward must be True or False, got {self.reshard_after_forward!r}"
            )


@dataclass(frozen=True, kw_only=True)
class RecomputeConfig:
    """Activation recomputation (checkpointing, Chen et al. 2016) of the model's blocks.

    - ``mode="full"``: keep only each block's input and recompute the whole block in backward.
      ``every=n`` checkpoints one block in ``n`` (a memory/compute trade-off).
    - ``mode="selective"``: run every block under a per-op policy
      (``torch.utils.checkpoint.create_selective_checkpoint_contexts``). ``ops`` names what to
      *recompute*; every other op's output is saved:

      * ``"attention"``: the attention core (scaled-dot-product attention, softmax, batched
        matmuls), as in Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
        Transformer Models": its activations are large (quadratic in sequence length) but cheap
        to recompute. Every other op's output is kept, also where autograd would not keep it
        (a residual add's): with attention kernels that store no score matrix (flash, and
        PyTorch's CPU SDPA) this keeps more than no recomputation (a tiny decoder's blocks:
        80.6 MiB against 50.1 MiB without and 29.1 MiB with ``"pointwise"``).
      * ``"pointwise"``: everything except the matrix multiplies and attention (norms,
        activations, residual adds): keeps the expensive outputs, recomputes the cheap ones.
      * a tuple of op names such as ``("aten._softmax", "aten.silu")``.

    - ``mode="auto"``: pick, per block, what to recompute so that the activations the block
      keeps for backward fit ``memory_budget`` bytes with the least extra compute (see
      :mod:`forge_parallel.auto_recompute`): nothing, a per-op selective policy, or the whole
      block. The block is measured on its first forward with gradients (one extra forward).
      ``budget_scope="block"``: ``memory_budget`` is per block; ``"total"``: for all blocks
      together (shared out in forward order).

    Checkpointing is always non-reentrant (``use_reentrant=False``).
    """

    mode: Literal["full", "selective", "auto"] = "full"
    ops: str | tuple[str, ...] = "attention"
    every: int = 1
    memory_budget: int | None = None
    budget_scope: Literal["block", "total"] = "block"

    def __post_init__(self) -> None:
        if self.mode not in ("full", "selective", "auto"):
            raise ValueError(
                f"recompute mode must be 'full' or 'selective', or 'auto' with a memory_budget; "
                f"got {self.mode!r}"
            )
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"every must be a positive integer, got {self.every!r}")
        if self.mode == "auto":
            budget = self.memory_budget
            if budget is None or isinstance(budget, bool) or not isinstance(budget, int):
                raise ValueError(
                    f"mode='auto' needs memory_budget=<bytes> (an int >= 0), got {budget!r}; "
                    "e.g. RecomputeConfig(mode='auto', memory_budget=64 * 2**20)"
                )
            if budget < 0:
                raise ValueError(f"memory_budget must be >= 0 bytes, got {budget}")
            if self.every != 1:
                raise ValueError(
                    f"every={self.every} applies to full recompute only; mode='auto' decides "
                    "per block"
                )
            if self.budget_scope not in ("block", "total"):
                raise ValueError(
                    f"budget_scope must be 'block' or 'total', got {self.budget_scope!r}"
                )
            return
        if self.memory_budget is not None:
            raise ValueError(
                f"memory_budget={self.memory_budget} is used by mode='auto' only, but "
                f"mode={self.mode!r}"
            )
        if self.mode == "selective" and self.every != 1:
            raise ValueError(
                f"every={self.every} applies to full recompute only; selective recompute runs "
                "its policy in every block"
            )
        if isinstance(self.ops, str):
            if self.ops not in _SELECTIVE_PRESETS:
                raise ValueError(
                    f"unknown selective recompute preset {self.ops!r}; use one of "
                    f"{', '.join(_SELECTIVE_PRESETS)} or a tuple of op names like "
                    "('aten._softmax',)"
                )
        elif not self.ops or not all(isinstance(o, str) for o in self.ops):
            raise ValueError(
                f"ops must be a preset name or a non-empty tuple of op names, got {self.ops!r}"
            )


@dataclass(frozen=True, kw_only=True)
class OffloadConfig:
    """Offload of the activations each block saves for backward to host memory.

    Tensors saved by a block's forward (``torch.autograd.graph.saved_tensors_hooks``) of at
    least ``min_bytes`` are copied to the CPU and copied back when backward needs them;
    parameters are never offloaded. On an accelerator the copies run on side streams into
    ``pin_memory`` buffers, overlapped with compute, and backward ``prefetch``-es the next
    block's tensors (in backward order) while the current block runs. On a CPU the tensors
    are moved to separate host buffers (correct, but saves no memory).
    With full recompute the offloaded tensors are the block inputs the checkpoint keeps.
    """

    min_bytes: int = 1024
    pin_memory: bool = True
    prefetch: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.min_bytes, bool) or not isinstance(self.min_bytes, int):
            raise ValueError(f"min_bytes must be an int, got {self.min_bytes!r}")
        if self.min_bytes < 0:
            raise ValueError(f"min_bytes must be >= 0, got {self.min_bytes}")
        for name in ("pin_memory", "prefetch"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")


@dataclass(frozen=True, kw_only=True)
class CompileConfig:
    """``torch.compile`` of each block (regional compilation: one graph reused by every block)."""

    backend: str = "inductor"
    fullgraph: bool = False
    dynamic: bool | None = None
