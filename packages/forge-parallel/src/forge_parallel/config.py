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
    - ``mode="selective"``: recompute part of each block. ``ops`` names what to *recompute*
      under a per-op policy (``torch.utils.checkpoint.create_selective_checkpoint_contexts``);
      every other op's output in the checkpointed region is saved:

      * ``"attention"`` (the default, ``ops=None``): the attention core, as in Korthikanti et
        al. 2022, "Reducing Activation Recomputation in Large Transformer Models" (its
        activations are large, quadratic in sequence length without a flash kernel, but cheap
        to recompute). The policy runs inside each block's attention submodule only (a child
        named ``attn``, ``self_attn`` or ``attention``, or the ``modules`` given): there it
        keeps the projections' outputs and recomputes the attention core and the cheap ops
        around it (rotary embedding, QK norm); outside it autograd decides what is kept.
        A tiny decoder's blocks (dim 256, 1024 tokens, CPU SDPA): 47.0 MiB kept against
        50.1 MiB without recompute, 5.0 with ``"full"``. Blocks without such a child run
        the policy over the whole block, saving every op's output but the attention core's,
        also where autograd would not keep it (a residual add's): 78.6 MiB there.
      * ``"pointwise"``: everything except the matrix multiplies and attention (norms,
        activations, residual adds) over the whole block: keeps the expensive outputs,
        recomputes the cheap ones (29.1 MiB there).
      * a tuple of op names such as ``("aten._softmax", "aten.silu")``.

      ``modules``: ``fnmatch`` patterns of submodule paths relative to each block, as
      Megatron-Core's ``--recompute-modules``, e.g. ``("attn", "mlp")`` or
      ``("self_attn", "mlp")`` for ``transformers`` models. Each matched submodule's forward
      is checkpointed: whole (``ops=None``), or under ``ops`` as its per-op policy; the rest
      of the block runs without checkpoint. There: ``("mlp",)`` 26.1 MiB, ``("attn",)``
      39.0 MiB, ``("attn", "mlp")`` 15.0 MiB. A pattern that matches in no block is an error.

    - ``mode="auto"``: pick, per block, what to recompute so that the activations the block
      keeps for backward fit ``memory_budget`` bytes with the least extra compute (see
      :mod:`forge_parallel.auto_recompute`): nothing, a per-op selective policy, or the whole
      block. The block is measured on its first forward with gradients (one extra forward).
      ``budget_scope="block"``: ``memory_budget`` is per block; ``"total"``: for all blocks
      together (shared out in forward order).

    Checkpointing is always non-reentrant (``use_reentrant=False``).
    """

    mode: Literal["full", "selective", "auto"] = "full"
    ops: str | tuple[str, ...] | None = None
    modules: tuple[str, ...] = ()
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
        self._check_modules()
        if self.ops is None:
            return
        if self.mode != "selective":
            raise ValueError(
                f"ops={self.ops!r} is the per-op policy of mode='selective', but "
                f"mode={self.mode!r}; drop ops or use mode='selective'"
            )
        if isinstance(self.ops, str):
            if self.ops not in _SELECTIVE_PRESETS:
                raise ValueError(
                    f"unknown selective recompute preset {self.ops!r}; use one of "
                    f"{', '.join(_SELECTIVE_PRESETS)} or a tuple of op names like "
                    "('aten._softmax',)"
                )
        elif (
            not isinstance(self.ops, tuple)
            or not self.ops
            or not all(isinstance(o, str) for o in self.ops)
        ):
            raise ValueError(
                f"ops must be a preset name or a non-empty tuple of op names, got {self.ops!r}"
            )

    def _check_modules(self) -> None:
        modules = self.modules
        if not isinstance(modules, tuple) or not all(isinstance(m, str) and m for m in modules):
            raise ValueError(
                "modules must be a tuple of submodule path patterns relative to each block, "
                f"like ('attn', 'mlp') or ('self_attn',), got {modules!r}"
            )
        if modules and self.mode != "selective":
            raise ValueError(
                f"modules={modules!r} choose the submodules that selective recompute "
                f"checkpoints, but mode={self.mode!r}; use mode='selective'"
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
