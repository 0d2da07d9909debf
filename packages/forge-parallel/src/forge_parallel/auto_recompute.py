"""Automatic activation recomputation: what to recompute to fit a memory budget, cheapest first.

Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost" (arXiv:1604.06174), trade
compute for memory by keeping only some activations; Korthikanti et al. 2022, "Reducing
Activation Recomputation in Large Transformer Models" (arXiv:2205.05198), observe that the
activations worth dropping are the ones that are large but cheap to recompute (the attention
scores), while the matrix-multiply outputs are worth keeping. This module makes that choice
from a measurement instead of a preset:

1. :func:`measure_block` runs the block's forward once under a ``TorchDispatchMode`` that
   records, per op call, the bytes of the new tensors it outputs and its FLOPs (matmuls and
   attention from ``torch.utils.flop_counter``'s formulas, one FLOP per output element for
   everything else, nothing for views), and under ``saved_tensors_hooks`` that record what
   autograd keeps for backward.
2. :func:`plan_recompute` picks, for a budget of bytes, the option with the least extra
   compute: nothing (if what autograd keeps fits), else selective checkpointing that *saves*
   the op outputs with the most FLOPs per byte (a greedy 0/1 knapsack: value = FLOPs not
   recomputed, weight = bytes kept) and recomputes every other op, else the whole block (full
   recompute keeps only the block's input). Collectives are always kept, never re-issued.

The selective policy is keyed like PyTorch's own SAC cache, by ``(op, n-th call of that op)``
in the block's forward, so each op *call* gets its own decision. PyTorch's compiler has a
related knob (``torch._functorch.config.activation_memory_budget``) that works on compiled
graphs only; this one works in eager mode and composes with tensor parallelism and FSDP.

Memory is counted as the bytes of the distinct storages the block keeps alive for backward:
its input (kept by every option) plus the outputs it keeps; parameters are not counted.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import (
    CheckpointPolicy,
    create_selective_checkpoint_contexts,
)

from forge_parallel.replay_checkpoint import checkpoint_block

__all__ = [
    "AutoRecompute",
    "BlockMeasurement",
    "OpRecord",
    "RecomputeChoice",
    "measure_block",
    "plan_recompute",
]

try:  # the ops SAC neither caches nor counts (torch >= 2.4)
    from torch.utils.checkpoint import SAC_IGNORED_OPS as _IGNORED
except ImportError:  # pragma: no cover - older torch
    _IGNORED = {torch.ops.aten.detach.default}


def _storage(t: torch.Tensor) -> torch.UntypedStorage:
    return getattr(t, "_local_tensor", t).untyped_storage()  # a DTensor's local shard


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


class _Storages:
    """Identifies storages across a forward, even when a freed address is reused."""

    def __init__(self) -> None:
        self.live: dict[int, int] = {}  # data_ptr -> id, while the storage is alive
        self.sizes: dict[int, int] = {}  # id -> bytes
        self._next = 0

    def _forget(self, ptr: int, uid: int) -> None:
        if self.live.get(ptr) == uid:
            del self.live[ptr]

    def find(self, t: torch.Tensor) -> int | None:
        try:
            return self.live.get(_storage(t).data_ptr())
        except RuntimeError:  # a tensor subclass without a storage of its own
            return None

    def add(self, t: torch.Tensor) -> tuple[int | None, bool]:
        """``(id, new)`` of ``t``'s storage, registering it if it was not known."""
        try:
            storage = _storage(t)
            ptr = storage.data_ptr()
        except RuntimeError:  # a tensor subclass without a storage of its own
            return None, False
        uid = self.live.get(ptr)
        if uid is not None:
            return uid, False
        uid = self._next
        self._next += 1
        self.live[ptr] = uid
        self.sizes[uid] = storage.nbytes()
        weakref.finalize(storage, self._forget, ptr, uid)
        return uid, True


@dataclass(frozen=True)
class OpRecord:
    """One op call of a block's forward: ``op`` is its n-th (``index``) call of that op."""

    op: str
    index: int
    output_bytes: int
    flops: int
    collective: bool

    @property
    def key(self) -> tuple[str, int]:
        return (self.op, self.index)


@dataclass(frozen=True)
class BlockMeasurement:
    """What one forward of a block computes and keeps.

    ``saved_bytes``: bytes autograd keeps for backward without recomputation (input included).
    ``input_bytes``: bytes of the block's tensor inputs (what full recomputation keeps).
    """

    ops: tuple[OpRecord, ...]
    input_bytes: int
    saved_bytes: int

    @property
    def total_flops(self) -> int:
        return sum(r.flops for r in self.ops)


@dataclass(frozen=True)
class RecomputeChoice:
    """The decision for one block: ``kind`` ``"none"``, ``"selective"`` or ``"full"``.

    ``saved``: the ``(op, index)`` calls whose outputs a selective policy keeps (every other
    op is recomputed). ``kept_bytes`` / ``extra_flops``: predicted memory kept for backward
    and forward FLOPs recomputed in backward.
    """

    kind: Literal["none", "selective", "full"]
    saved: frozenset[tuple[str, int]]
    kept_bytes: int
    extra_flops: int

    def describe(self) -> str:
        mib = self.kept_bytes / 2**20
        if self.kind == "selective":
            return f"auto: selective (saves {len(self.saved)} ops, {mib:.2f} MiB)"
        return f"auto: {self.kind} ({mib:.2f} MiB)"


def _flops(func, args, kwargs, out) -> int:
    from torch.utils.flop_counter import flop_registry

    counter = flop_registry.get(func.overloadpacket)
    if counter is not None:
        return int(counter(*args, **kwargs, out_val=out))
    return sum(t.numel() for t in _tensors(out))


class _Recorder(TorchDispatchMode):
    """Records each op call's new output storages and FLOPs, keyed like SAC's cache."""

    #: It sees the ops the selective policy decides on, no others: a unit that the policy
    #: recomputes whole (``forge_parallel.replay_checkpoint.recomputed_whole``, the
    #: context-parallel attention) is neither recorded nor keyed.
    sees_ops_like_selective_checkpoint = True

    def __init__(self, storages: _Storages) -> None:
        super().__init__()
        self.storages = storages
        self.counts: dict[Any, int] = defaultdict(int)
        self.records: list[OpRecord] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _IGNORED:
            return out
        index = self.counts[func]
        self.counts[func] += 1
        nbytes = 0
        for t in _tensors(out):
            uid, new = self.storages.add(t)
            nbytes += self.storages.sizes[uid] if new else 0
        name = str(func)
        flops = _flops(func, args, kwargs, out) if nbytes else 0
        self.records.append(OpRecord(name, index, nbytes, flops, "c10d" in name))
        return out


def measure_block(block: Callable, *args: Any, **kwargs: Any) -> BlockMeasurement:
    """Run ``block(*args, **kwargs)`` once (with gradients) and record what it computes and keeps.

    ``block`` may have a ``parameters()`` method (a module): parameters are not activations.
    The RNG state is restored afterwards, so the measurement does not change a later forward.
    """
    storages = _Storages()
    get_params = getattr(block, "parameters", None)
    params = {storages.add(p)[0] for p in (get_params() if callable(get_params) else ())}
    inputs = {storages.add(t)[0] for t in _tensors((args, kwargs))} - params - {None}
    saved: set[int] = set()

    def pack(t: torch.Tensor) -> int | None:
        # Returns an id, not ``t``: a saved output packed as itself would be a reference
        # cycle through C++ that keeps the measured graph alive.
        uid = storages.find(t)
        if uid is not None:
            saved.add(uid)
        return uid

    def unpack(uid: int | None) -> torch.Tensor:
        raise RuntimeError("the measurement forward of auto recompute has no backward")

    recorder = _Recorder(storages)
    devices = sorted({t.device.index or 0 for t in _tensors((args, kwargs)) if t.is_cuda})
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack), recorder:
            out = block(*args, **kwargs)
        del out
    sizes = storages.sizes
    return BlockMeasurement(
        ops=tuple(recorder.records),
        input_bytes=sum(sizes[u] for u in inputs),
        saved_bytes=sum(sizes[u] for u in (saved - params) | inputs),
    )


def plan_recompute(measurement: BlockMeasurement, budget: int) -> RecomputeChoice:
    """The option with the least recomputed FLOPs whose kept bytes fit ``budget``.

    Falls back to full recomputation (the least memory) when nothing fits, e.g. ``budget=0``.
    """
    total = measurement.total_flops
    if measurement.saved_bytes <= budget:
        return RecomputeChoice("none", frozenset(), measurement.saved_bytes, 0)
    full = RecomputeChoice("full", frozenset(), measurement.input_bytes, total)
    forced = [r for r in measurement.ops if r.collective]
    kept = measurement.input_bytes + sum(r.output_bytes for r in forced)
    if kept > budget:
        return full
    saved = {r.key for r in forced}
    kept_flops = sum(r.flops for r in forced)
    candidates = [r for r in measurement.ops if r.output_bytes > 0 and not r.collective]
    # Greedy knapsack: most FLOPs kept per byte first; skip what does not fit, keep filling.
    candidates.sort(key=lambda r: (-r.flops / r.output_bytes, r.output_bytes))
    for r in candidates:
        if kept + r.output_bytes <= budget:
            kept += r.output_bytes
            kept_flops += r.flops
            saved.add(r.key)
    if kept_flops == 0:
        return full
    return RecomputeChoice("selective", frozenset(saved), kept, total - kept_flops)


def _keyed_policy(saved: frozenset[tuple[str, int]]) -> Callable:
    """A fresh SAC context pair whose policy saves exactly the ``saved`` op calls."""
    counts = {False: defaultdict(int), True: defaultdict(int)}

    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        name = str(op)
        per_op = counts[bool(ctx.is_recompute)]
        index = per_op[name]
        per_op[name] += 1
        if (name, index) in saved:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


class _Budget:
    """What is left of a total budget, shared out across blocks in forward order."""

    def __init__(self, total: int, blocks: int) -> None:
        self.left, self.blocks_left = total, blocks

    def share(self) -> int:
        return self.left // max(self.blocks_left, 1)

    def spend(self, nbytes: int) -> None:
        self.left = max(self.left - nbytes, 0)
        self.blocks_left -= 1


class AutoRecompute:
    """A block's forward under the automatic policy, decided on its first forward with grads.

    ``choice`` is ``None`` until then; afterwards it is the :class:`RecomputeChoice` and the
    block runs without checkpointing, with the selective policy, or fully checkpointed.
    """

    def __init__(self, inner: Callable, budget: int | _Budget, module: nn.Module) -> None:
        self.inner = inner
        self.budget = budget
        self.module = module
        self.choice: RecomputeChoice | None = None
        self.measurement: BlockMeasurement | None = None

    def _decide(self, args: tuple, kwargs: dict) -> None:
        self.measurement = measure_block(_ModuleView(self.inner, self.module), *args, **kwargs)
        # Under autocast the measuring forward cached this block's weight casts; the checkpointed
        # forward that follows would hit that cache while its recomputation (in backward, after
        # the cache is gone) casts again, and the selective policy's per-op call counts would
        # no longer line up. Drop the cache so both passes cast the same way.
        torch.clear_autocast_cache()
        budget = self.budget if isinstance(self.budget, int) else self.budget.share()
        self.choice = plan_recompute(self.measurement, budget)
        if isinstance(self.budget, _Budget):
            self.budget.spend(self.choice.kept_bytes)
        self.module._forge_recompute = self.choice.describe()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.choice is None:
            if not torch.is_grad_enabled():
                return self.inner(*args, **kwargs)
            self._decide(args, kwargs)
        choice = self.choice
        if choice.kind == "none":
            return self.inner(*args, **kwargs)
        if choice.kind == "full":
            return checkpoint_block(self.inner, *args, **kwargs)
        return checkpoint_block(
            self.inner, *args, context_fn=lambda: _keyed_policy(choice.saved), **kwargs
        )


class _ModuleView:
    """``inner`` called like the module, exposing the module's parameters to the measurement."""

    def __init__(self, inner: Callable, module: nn.Module) -> None:
        self.inner, self.module = inner, module

    def parameters(self) -> Iterable[torch.Tensor]:
        return self.module.parameters()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)


def auto_budgets(config_budget: int, scope: str, blocks: int) -> Callable[[], int | _Budget]:
    """One budget per block (``scope="block"``) or one shared total (``"total"``)."""
    if scope == "total":
        shared = _Budget(config_budget, blocks)
        return lambda: shared
    return lambda: config_budget
