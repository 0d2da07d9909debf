"""Keyword-only configuration of each parallel dimension, validated when constructed.

Each dataclass configures one ``apply_*`` helper; :func:`forge_parallel.parallelize` takes them
as keyword arguments. The tensor-parallel plan (:class:`~forge_parallel.TPPlan`) lives beside
the code that applies it, in :mod:`forge_parallel.tensor_parallel`.
"""

from __future__ import annotations

import difflib
import functools
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

# Dispatch keys whose kernel makes an op reach the selective-checkpoint policy (a
# TorchDispatchMode, below autograd) rather than decompose at the autograd key.
_BACKEND_KEYS = (
    "CPU",
    "CUDA",
    "XPU",
    "MPS",
    "HIP",
    "PrivateUse1",
    "CompositeExplicitAutograd",
    "CompositeExplicitAutogradNonFunctional",
)
# What common CompositeImplicitAutograd ops run instead, where the name alone does not tell
# (``_decomposed_into`` also finds ``softmax -> _softmax``, ``layer_norm -> native_layer_norm``).
_DECOMPOSED_INTO = {
    "linear": ("aten.mm", "aten.addmm", "aten.bmm"),
    "matmul": ("aten.mm", "aten.bmm"),
    "einsum": ("aten.bmm", "aten.mm"),
    "rms_norm": ("aten.pow", "aten.mean", "aten.rsqrt", "aten.mul", "aten._fused_rms_norm"),
    "dropout": ("aten.native_dropout", "aten.bernoulli_"),
    "cross_entropy_loss": ("aten._log_softmax", "aten.nll_loss_forward"),
    "scaled_dot_product_attention": (
        "aten._scaled_dot_product_flash_attention_for_cpu",
        "aten._scaled_dot_product_flash_attention",
        "aten._scaled_dot_product_efficient_attention",
        "aten._scaled_dot_product_cudnn_attention",
    ),
}


@functools.cache
def _aten_overloads() -> dict[str, tuple[str, ...]]:
    """aten op name (``"softmax"``) -> its overloads' dispatcher names (``"aten::softmax.int"``).
    Every aten op is registered when torch is imported."""
    table: dict[str, list[str]] = {}
    for full in torch._C._dispatch_get_all_op_names():
        if full.startswith("aten::"):
            table.setdefault(full[6:].split(".", 1)[0], []).append(full)
    return {name: tuple(overloads) for name, overloads in table.items()}


def _reaches_policy(name: str) -> bool:
    """Whether aten op ``name`` can reach the selective-checkpoint policy under autograd.

    An op whose only kernel is CompositeImplicitAutograd (``softmax``, ``linear``,
    ``scaled_dot_product_attention``) is decomposed at the autograd key, before any
    TorchDispatchMode sees it: the policy sees the ops it runs instead. ``out=`` overloads are
    skipped (autograd refuses them).
    """
    packet = getattr(torch.ops.aten, name)
    for full in _aten_overloads()[name]:
        overload = full.split(".", 1)[1] if "." in full else "default"
        if any(a.is_out for a in getattr(packet, overload)._schema.arguments):
            continue
        has = functools.partial(torch._C._dispatch_has_kernel_for_dispatch_key, full)
        if not has("CompositeImplicitAutograd") or any(has(key) for key in _BACKEND_KEYS):
            return True
    return False


def _decomposed_into(name: str) -> tuple[str, ...]:
    """Ops a decomposed aten op ``name`` likely runs instead (for the error message)."""
    if name in _DECOMPOSED_INTO:
        return _DECOMPOSED_INTO[name]
    found = [
        other
        for other in _aten_overloads()
        if (
            other in (f"_{name}", f"native_{name}", f"_native_{name}")
            or (other.startswith(f"_{name}_") and "backward" not in other)
        )
        and _reaches_policy(other)
    ]
    return tuple(f"aten.{other}" for other in sorted(found))


def _check_op_name(op: str) -> None:
    """``ValueError`` for an ``ops`` entry the policy can never match: it compares each op's
    packet name (``"aten._softmax"``), so a name without namespace, an unknown aten op, an
    overload (``"aten.silu.default"``) or an op decomposed before the policy would leave the
    policy saving every op's output (more memory than no recompute). Names in other
    namespaces (custom ops, collectives) are not checked: their library may register them
    after the config is built."""
    namespace, _, name = op.partition(".")
    if "::" in op:
        namespace, _, name = op.partition("::")
    if not name:
        bare = op.strip()
        hint = ""
        if bare in _aten_overloads():
            hint = f"; did you mean 'aten.{bare}'?"
        else:
            close = difflib.get_close_matches(bare, list(_aten_overloads()), n=3)
            if close:
                hint = "; did you mean " + " or ".join(f"'aten.{c}'" for c in close) + "?"
        raise ValueError(
            f"ops entry {op!r} has no namespace: the selective recompute policy matches op "
            f"names like 'aten.silu' or 'aten._softmax'{hint}"
        )
    if namespace != "aten":
        return
    if "::" in op or "." in name:
        packet = name.split(".", 1)[0]
        raise ValueError(
            f"ops entry {op!r}: the policy matches op names without overload, written "
            f"'aten.{packet}'; use 'aten.{packet}'"
        )
    if name not in _aten_overloads():
        close = difflib.get_close_matches(name, list(_aten_overloads()), n=3)
        hint = "; did you mean " + " or ".join(f"'aten.{c}'" for c in close) + "?" if close else ""
        raise ValueError(f"ops entry {op!r}: there is no op torch.ops.aten.{name}{hint}")
    if not _reaches_policy(name):
        into = _decomposed_into(name)
        runs = (
            f"; it runs {', '.join(repr(o) for o in into)} (name those)"
            if into
            else "; name the ops it runs (list them with a TorchDispatchMode over one forward)"
        )
        raise ValueError(
            f"ops entry {op!r}: aten.{name} is CompositeImplicitAutograd, decomposed before "
            f"the selective recompute policy sees any op, so it never matches{runs}"
        )


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
        for name in ("reshard_after_forward", "cpu_offload"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")


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
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"every must be a positive integer, got {self.every!r}")
        if self.budget_scope not in ("block", "total"):
            raise ValueError(f"budget_scope must be 'block' or 'total', got {self.budget_scope!r}")
        if self.mode == "auto":
            # auto chooses what to recompute per block itself: ops / modules would be ignored.
            if self.ops is not None or self.modules != ():
                given = "ops" if self.ops is not None else "modules"
                raise ValueError(
                    f"{given}={getattr(self, given)!r} is ignored by mode='auto', which chooses "
                    "per block between no recompute, a per-op policy of its own and the whole "
                    f"block; drop {given}=, or use mode='selective' with {given}= (no budget)"
                )
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
            return
        if self.memory_budget is not None:
            raise ValueError(
                f"memory_budget={self.memory_budget} is used by mode='auto' only, but "
                f"mode={self.mode!r}"
            )
        if self.budget_scope != "block":
            raise ValueError(
                f"budget_scope={self.budget_scope!r} shares out mode='auto''s memory_budget, "
                f"but mode={self.mode!r}; drop budget_scope or use mode='auto'"
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
        else:
            for op in self.ops:
                _check_op_name(op)

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

    def __post_init__(self) -> None:
        # torch.compile reads these as truth values: 'no' would silently mean True.
        if not (callable(self.backend) or (isinstance(self.backend, str) and self.backend)):
            raise ValueError(
                f"backend must be a torch.compile backend name such as 'inductor' (or a "
                f"backend callable), got {self.backend!r}"
            )
        if not isinstance(self.fullgraph, bool):
            raise ValueError(f"fullgraph must be True or False, got {self.fullgraph!r}")
        if self.dynamic is not None and not isinstance(self.dynamic, bool):
            raise ValueError(f"dynamic must be True, False or None, got {self.dynamic!r}")
