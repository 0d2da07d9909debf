"""Automatic activation recomputation: what to recompute to fit a memory budget, cheapest first.

Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost" (arXiv:1604.06174), trade
compute for memory by keeping only some activations; Korthikanti et al. 2022, "Reducing
Activation Recomputation in Large Transformer Models" (arXiv:2205.05198), observe that the
activations worth dropping are the ones that are large but cheap to recompute (the attention
scores), while the matrix-multiply outputs are worth keeping. This module makes that choice
from a measurement instead of a preset:

1. :func:`measure_block` runs the block's forward once under a ``TorchDispatchMode`` that
   records, per op call, the bytes of the new tensors it outputs and its FLOPs (matmuls and
   attention from ``torch.utils.flop_counter``'s formulas, nothing for views and allocations
   (``empty*``), one FLOP per output element for everything else), whether a later op writes
   into its output in place, and under ``saved_tensors_hooks`` what autograd keeps for
   backward. The measurement leaves no trace: the state the forward updates (BatchNorm's
   running statistics, an FP8 delayed-scaling amax history, a call counter) is put back
   afterwards, so the real forward that follows updates it once, as without recompute.
2. :func:`plan_recompute` picks, for a budget of bytes, the option with the least extra
   compute it finds: nothing (if what autograd keeps fits), else selective checkpointing that
   *saves* some op outputs and recomputes every other op, else the whole block (full
   recompute keeps only the block's input). The saved outputs are a 0/1 knapsack (value =
   FLOPs not recomputed, weight = bytes kept), solved approximately: the better of filling
   greedily by FLOPs per byte, and the single output that keeps the most FLOPs then filled
   greedily (at least half the best possible saving). Functional collectives
   (``_c10d_functional``) are always kept, never re-issued; in-place ones (``c10d``, forge's
   autograd all-to-all) and the buffers they fill are always recomputed, as is an output a
   later op writes in place (an ``inplace=True`` activation, dropout's mask buffer): a saved
   copy would be the written one, and the recomputation would write it a second time.
   Whole-submodule checkpoints of the block's direct children (its ``attn``, its ``mlp``, or
   both: Megatron-Core's ``--recompute-modules``, ``RecomputeConfig(modules=...)``) are
   candidates too, measured in the same pass: each op call and each saved tensor is
   attributed to the direct child whose forward ran it (module forward hooks), so a set of
   checkpointed children keeps what the rest of the block saves plus the children's inputs
   and recomputes the children's forward FLOPs (collectives inside them are re-issued, as with
   ``modules=...``). The least extra compute that fits wins; ties go to fewer bytes.

The selective policy is keyed like PyTorch's own SAC cache, by ``(op, n-th call of that op)``
in the block's forward, so each op *call* gets its own decision. PyTorch's compiler has a
related knob (``torch._functorch.config.activation_memory_budget``) that works on compiled
graphs only; this one works in eager mode and composes with tensor parallelism and FSDP.

Memory is counted as the bytes of the distinct storages the block keeps alive for backward:
its input (kept by every option) plus the outputs it keeps; parameters are not counted.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
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


def storage_ptr(t: torch.Tensor) -> int | None:
    """The address of ``t``'s storage (a DTensor's local shard's), ``None`` for a tensor
    subclass without a storage of its own."""
    try:
        return _storage(t).data_ptr()
    except RuntimeError:
        return None


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
        ptr = storage_ptr(t)
        return None if ptr is None else self.live.get(ptr)

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
    #: The block's direct child whose forward ran the op ("" outside every child).
    module: str = ""

    #: A later op of the forward writes into this output in place: never saved (see
    #: :func:`written_tensors`).
    written_later: bool = False

    @property
    def key(self) -> tuple[str, int]:
        return (self.op, self.index)

    @property
    def savable(self) -> bool:
        """Worth saving: new bytes that cost FLOPs to recompute, safe to cache."""
        return (
            self.output_bytes > 0 and self.flops > 0 and not (self.collective or self.written_later)
        )


@dataclass(frozen=True)
class BlockMeasurement:
    """What one forward of a block computes and keeps.

    ``saved_bytes``: bytes autograd keeps for backward without recomputation (input included).
    ``input_bytes``: bytes of the block's tensor inputs (what full recomputation keeps).
    ``storage_bytes`` / ``saved_in`` / ``module_inputs`` / ``input_ids``: per storage id, its
    bytes; per saved storage, the direct children ("" for the block outside them) whose
    forward saved it; per direct child, the storages of its tensor inputs; the block's input
    storages. From them :meth:`kept_with_checkpointed` predicts submodule checkpoints.
    """

    ops: tuple[OpRecord, ...]
    input_bytes: int
    saved_bytes: int
    storage_bytes: dict[int, int] = field(default_factory=dict)
    saved_in: dict[int, frozenset[str]] = field(default_factory=dict)
    module_inputs: dict[str, frozenset[int]] = field(default_factory=dict)
    input_ids: frozenset[int] = frozenset()

    @property
    def total_flops(self) -> int:
        return sum(r.flops for r in self.ops)

    def module_flops(self, modules: Iterable[str]) -> int:
        """Forward FLOPs of the ops the direct children ``modules`` run."""
        names = set(modules)
        return sum(r.flops for r in self.ops if r.module in names)

    def kept_with_checkpointed(self, modules: Iterable[str]) -> int:
        """Bytes kept for backward with the direct children ``modules`` checkpointed whole:
        what is saved outside them, their inputs (the checkpoints keep them) and the block's."""
        names = set(modules)
        kept = {u for u, where in self.saved_in.items() if not where <= names}
        kept |= self.input_ids
        for name in names:
            kept |= self.module_inputs.get(name, frozenset())
        return sum(self.storage_bytes[u] for u in kept)


@dataclass(frozen=True)
class RecomputeChoice:
    """The decision for one block: ``kind`` ``"none"``, ``"selective"``, ``"modules"`` (the
    direct children ``modules`` checkpointed whole) or ``"full"``.

    ``saved``: the ``(op, index)`` calls whose outputs a selective policy keeps (every other
    op is recomputed). ``kept_bytes`` / ``extra_flops``: predicted memory kept for backward
    and forward FLOPs recomputed in backward.
    """

    kind: Literal["none", "selective", "modules", "full"]
    saved: frozenset[tuple[str, int]]
    kept_bytes: int
    extra_flops: int
    modules: tuple[str, ...] = ()

    def describe(self) -> str:
        mib = self.kept_bytes / 2**20
        if self.kind == "modules":
            return f"auto: modules {','.join(self.modules)} ({mib:.2f} MiB)"
        if self.kind == "selective":
            return f"auto: selective (saves {len(self.saved)} ops, {mib:.2f} MiB)"
        return f"auto: {self.kind} ({mib:.2f} MiB)"


#: Ops that only allocate (their output's values are whatever the memory held): nothing to
#: recompute. Costed at one FLOP per element, saving dropout's mask buffer looked worthwhile.
_ALLOCATIONS = frozenset(
    {
        "aten.empty",
        "aten.empty_like",
        "aten.new_empty",
        "aten.empty_strided",
        "aten.new_empty_strided",
        "aten.empty_permuted",
    }
)


def is_inplace_collective(name: str) -> bool:
    """``name`` (``"c10d.alltoall_base_"``, with or without overload) is an in-place c10d
    collective: it fills a buffer made by an earlier op (``new_empty``). A selective policy
    must recompute it with its buffer: cached, the recomputation would get a fresh, never
    filled buffer (or the cached one, written after it was cached). Their schemas do not mark
    the write, hence the name (trailing ``_``); functional collectives (``_c10d_functional``)
    return new tensors and may be kept."""
    parts = name.split(".")
    return len(parts) > 1 and parts[0] == "c10d" and parts[1].endswith("_")


def is_kept_collective(name: str) -> bool:
    """A collective a selective policy keeps (never re-issues in backward): a functional one."""
    return "c10d" in name and not is_inplace_collective(name)


#: Batch-norm ops that update their ``running_mean`` / ``running_var`` arguments in place
#: although their schemas do not mark them written (the legacy forms; ``nn.BatchNorm*`` runs
#: ``native_batch_norm`` on CPU, ``cudnn_batch_norm`` on CUDA, SyncBatchNorm the gather ops):
#: op -> the position of their ``training`` flag (``None``: they always update).
_UNMARKED_RUNNING_STATS: dict[str, int | None] = {
    "aten.native_batch_norm": 5,
    "aten.cudnn_batch_norm": 5,
    "aten.miopen_batch_norm": 5,
    "aten.batch_norm_update_stats": None,
    "aten.batch_norm_gather_stats": None,
    "aten.batch_norm_gather_stats_with_counts": None,
}


def _argument(schema: Any, args: tuple, kwargs: dict, i: int) -> Any:
    return args[i] if i < len(args) else kwargs.get(schema.arguments[i].name)


def written_tensors(func: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors ``func(*args, **kwargs)`` writes in place: its schema's written arguments
    (``relu_``, ``bernoulli_``, ``out=``), an in-place collective's first argument (the
    output buffer of ``alltoall_base_``, the tensors of ``allreduce_``), or the running
    statistics a legacy batch-norm op updates (:data:`_UNMARKED_RUNNING_STATS`)."""
    schema = getattr(func, "_schema", None)
    if schema is None:
        return []
    name = str(getattr(func, "overloadpacket", func))
    if is_inplace_collective(name):
        return _tensors(args[:1])
    written = []
    if name in _UNMARKED_RUNNING_STATS:
        flag = _UNMARKED_RUNNING_STATS[name]
        if flag is None or _argument(schema, args, kwargs, flag):
            for i, argument in enumerate(schema.arguments):
                if argument.name in ("running_mean", "running_var"):
                    written += _tensors(_argument(schema, args, kwargs, i))
    if not schema.is_mutable:
        return written
    for i, argument in enumerate(schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            written += _tensors(_argument(schema, args, kwargs, i))
    return written


def _flops(func, args, kwargs, out) -> int:
    from torch.utils.flop_counter import flop_registry

    if str(func.overloadpacket) in _ALLOCATIONS:
        return 0
    counter = flop_registry.get(func.overloadpacket)
    if counter is not None:
        return int(counter(*args, **kwargs, out_val=out))
    return sum(t.numel() for t in _tensors(out))


class _Recorder(TorchDispatchMode):
    """Records each op call's new output storages and FLOPs, keyed like SAC's cache, and which
    calls' outputs a later op writes in place (``written``: indices into ``records``)."""

    #: It sees the ops the selective policy decides on, no others: a unit that the policy
    #: recomputes whole (``forge_parallel.replay_checkpoint.recomputed_whole``, the
    #: context-parallel attention) is neither recorded nor keyed.
    sees_ops_like_selective_checkpoint = True

    def __init__(self, storages: _Storages) -> None:
        super().__init__()
        self.storages = storages
        self.counts: dict[Any, int] = defaultdict(int)
        self.records: list[OpRecord] = []
        self.module_stack: list[str] = []  # the direct children whose forward is running
        self.producer: dict[int, int] = {}  # storage id -> index of the record that made it
        self.written: set[int] = set()
        self.allocated: set[int] = set()  # storage ids this forward allocated (no views)
        self.backups: list[tuple[torch.Tensor, torch.Tensor]] = []  # (written view, old values)
        self._backed_up: set[tuple[Any, ...]] = set()

    @property
    def module(self) -> str:
        return self.module_stack[0] if self.module_stack else ""

    def _back_up(self, t: torch.Tensor) -> None:
        """Keep a copy of ``t``'s values before its first in-place write in this forward."""
        local = getattr(t, "_local_tensor", t)  # a DTensor's shard: copies stay local
        ptr = storage_ptr(local)
        key = (id(local) if ptr is None else ptr, local.storage_offset(), local.shape)
        key += (local.stride(), local.dtype)
        if key not in self._backed_up:
            self._backed_up.add(key)
            self.backups.append((local, local.detach().clone()))

    def restore(self) -> None:
        """Put back what the forward wrote in place into tensors older than it, newest copy
        first: where two written views overlap, the older copy (taken before any write to the
        overlap) is the one left."""
        with torch.no_grad():
            for view, old in reversed(self.backups):
                view.copy_(old)
        self.backups.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        written = written_tensors(func, args, kwargs)
        for t in written:
            uid = self.storages.find(t)
            producer = self.producer.get(uid)
            if producer is not None:
                self.written.add(producer)
            if uid not in self.allocated:  # module state, an input, or a view of them
                self._back_up(t)
        out = func(*args, **kwargs)
        if func in _IGNORED:
            return out
        index = self.counts[func]
        self.counts[func] += 1
        nbytes = 0
        arguments: set[int | None] | None = None
        # What the op wrote in place is no new output, also the first time it is seen (module
        # state: ``num_batches_tracked.add_(1)``, an EMA buffer): no bytes, so never saved (a
        # cached in-place output fails PyTorch's "has been mutated" check in backward).
        targets = {storage_ptr(t) for t in written}
        for t in _tensors(out):
            uid, new = self.storages.add(t)
            if new and storage_ptr(t) not in targets:
                nbytes += self.storages.sizes[uid]
                self.producer[uid] = len(self.records)
                if arguments is None:
                    arguments = {storage_ptr(a) for a in _tensors((args, kwargs))}
                if storage_ptr(t) not in arguments:  # not a view of an older tensor
                    self.allocated.add(uid)
        name = str(func)
        flops = _flops(func, args, kwargs, out) if nbytes else 0
        collective = is_kept_collective(name)
        self.records.append(OpRecord(name, index, nbytes, flops, collective, self.module))
        return out


def _module_of(block: Callable) -> nn.Module | None:
    """The module a measured ``block`` runs: itself, or a :class:`_ModuleView`'s module."""
    module = block if isinstance(block, nn.Module) else getattr(block, "module", None)
    return module if isinstance(module, nn.Module) else None


def _direct_children(block: Callable) -> list[tuple[str, nn.Module]]:
    module = _module_of(block)
    if module is None:
        return []
    # A container's forward never runs (the block calls its members): not a candidate.
    return [
        (name, child)
        for name, child in module.named_children()
        if not isinstance(child, nn.ModuleList | nn.ModuleDict)
    ]


def _track_children(
    children: list[tuple[str, nn.Module]], recorder: _Recorder, module_inputs: dict[str, set]
) -> list[Any]:
    """Forward hooks that keep ``recorder.module_stack`` and each child's input storages."""
    handles = []
    for name, child in children:

        def enter(_module, args, kwargs, name=name):
            recorder.module_stack.append(name)
            for t in _tensors((args, kwargs)):
                module_inputs[name].add(recorder.storages.add(t)[0])

        def leave(_module, _args, _out):
            recorder.module_stack.pop()

        handles.append(child.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(child.register_forward_hook(leave))
    return handles


#: The attribute types of a module whose values a measurement puts back (a forward's counter).
_SCALARS = (int, float, bool)


def _scalar_attributes(modules: list[nn.Module]) -> list[tuple[nn.Module, dict, dict]]:
    """Per module, its scalar attributes and its buffer slots (a forward may reassign one:
    ``self.ema = self.ema * m + x``)."""
    return [
        (m, {k: v for k, v in vars(m).items() if type(v) in _SCALARS}, dict(m._buffers))
        for m in modules
    ]


def _restore_scalar_attributes(saved: list[tuple[nn.Module, dict, dict]]) -> None:
    for module, values, buffers in saved:
        attributes = vars(module)
        for name, value in values.items():
            if attributes.get(name, value) is not value:
                attributes[name] = value
        for name, tensor in buffers.items():
            if module._buffers.get(name) is not tensor:
                module._buffers[name] = tensor


def _buffer_values(modules: list[nn.Module]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each buffer of ``modules`` (a DTensor's local shard; once if shared) and a copy of its
    values: what the measurement puts back, including writes no dispatch mode sees (FP8
    delayed scaling updates its amax history outside a mode that keys ops as a selective
    checkpoint does, :class:`_Recorder` included, because a recomputation skips that update;
    ``forge_kernels.fp8.quantize``)."""
    values, seen = [], set()
    with torch.no_grad():
        for module in modules:
            for tensor in module._buffers.values():
                local = None if tensor is None else getattr(tensor, "_local_tensor", tensor)
                if local is not None and not local.is_inference() and id(local) not in seen:
                    seen.add(id(local))
                    values.append((local, local.detach().clone()))
    return values


def _restore_buffer_values(values: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for tensor, old in values:
            tensor.data.copy_(old)


def measure_block(block: Callable, *args: Any, **kwargs: Any) -> BlockMeasurement:
    """Run ``block(*args, **kwargs)`` once (with gradients) and record what it computes and keeps.

    ``block`` may have a ``parameters()`` method (a module): parameters are not activations.

    The measurement leaves no trace, so the forward that follows it runs as if it were the
    first (the next one updates module state once per step, as without recompute, and its
    outputs are those of a run without the measurement): the RNG state is restored; every
    tensor that existed before it and that its ops write in place (a module's buffers:
    BatchNorm's running statistics and ``num_batches_tracked``, an FP8 delayed-scaling amax
    history and scale; parameters, also written through ``.data``; the inputs; a global) is
    copied just before its first write and copied back afterwards; the buffers of ``block``'s
    modules are copied before it and put back afterwards whatever wrote them (also outside
    the measuring mode, as FP8 delayed scaling's history update: :func:`_buffer_values`); and
    the ``int`` / ``float`` / ``bool`` attributes of ``block``'s modules (a call counter, a
    "first call done" flag) get their old values back, as do the buffers it reassigns.
    Copying is exact (the old bits come back) and cheap: what the forward writes and the
    block's buffers, usually a few small ones, once per block. Python containers the forward
    changes (a list it appends to) are not restored.
    Measuring the real forward instead would run it before its recompute policy exists: with
    everything kept for backward (over the budget the measurement is there to meet), or
    under a checkpoint whose own saved-tensor hooks would hide what autograd keeps.
    """
    storages = _Storages()
    get_params = getattr(block, "parameters", None)
    params = {storages.add(p)[0] for p in (get_params() if callable(get_params) else ())}
    inputs = {storages.add(t)[0] for t in _tensors((args, kwargs))} - params - {None}
    saved: dict[int, set[str]] = defaultdict(set)  # storage id -> where it was saved
    recorder = _Recorder(storages)

    def pack(t: torch.Tensor) -> int | None:
        # Returns an id, not ``t``: a saved output packed as itself would be a reference
        # cycle through C++ that keeps the measured graph alive.
        uid = storages.find(t)
        if uid is not None:
            saved[uid].add(recorder.module)
        return uid

    def unpack(uid: int | None) -> torch.Tensor:
        raise RuntimeError("the measurement forward of auto recompute has no backward")

    devices = sorted({t.device.index or 0 for t in _tensors((args, kwargs)) if t.is_cuda})
    module_inputs: dict[str, set] = defaultdict(set)
    module = _module_of(block)
    modules = [] if module is None else list(module.modules())
    scalars = _scalar_attributes(modules)
    buffers = _buffer_values(modules)
    handles = _track_children(_direct_children(block), recorder, module_inputs)
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack), recorder:
                out = block(*args, **kwargs)
            del out  # (frees the measured graph: FP8 delayed scaling's pending forward too)
    finally:
        for handle in handles:
            handle.remove()
        recorder.restore()
        _restore_scalar_attributes(scalars)
        _restore_buffer_values(buffers)
    sizes = storages.sizes
    saved_in = {u: frozenset(where) for u, where in saved.items() if u not in params}
    module_inputs = {n: frozenset(ids - params - {None}) for n, ids in module_inputs.items()}
    used = set(saved_in) | inputs | {u for ids in module_inputs.values() for u in ids}
    ops = tuple(
        dataclasses.replace(r, written_later=True) if i in recorder.written else r
        for i, r in enumerate(recorder.records)
    )
    return BlockMeasurement(
        ops=ops,
        input_bytes=sum(sizes[u] for u in inputs),
        saved_bytes=sum(sizes[u] for u in set(saved_in) | inputs),
        storage_bytes={u: sizes[u] for u in used},
        saved_in=saved_in,
        module_inputs=module_inputs,
        input_ids=frozenset(inputs),
    )


def _module_sets(names: list[str]) -> list[tuple[str, ...]]:
    """Every non-empty set of up to 6 direct children; with more, each one alone and all."""
    if len(names) > 6:
        return [(n,) for n in names] + [tuple(names)]
    return [c for k in range(1, len(names) + 1) for c in itertools.combinations(names, k)]


def _module_choices(measurement: BlockMeasurement) -> list[RecomputeChoice]:
    """Whole-submodule checkpoints of the direct children that ran ops with FLOPs."""
    names = list(dict.fromkeys(r.module for r in measurement.ops if r.module and r.flops))
    return [
        RecomputeChoice(
            "modules",
            frozenset(),
            measurement.kept_with_checkpointed(chosen),
            measurement.module_flops(chosen),
            chosen,
        )
        for chosen in _module_sets(names)
    ]


def plan_recompute(measurement: BlockMeasurement, budget: int) -> RecomputeChoice:
    """Among the options it builds, the one with the least recomputed FLOPs whose kept bytes
    fit ``budget`` (ties: the fewer bytes): nothing, a selective policy (an approximate
    knapsack, see :func:`_plan_selective`), whole direct children checkpointed, or full.

    Falls back to full recomputation (the least memory) when nothing fits, e.g. ``budget=0``.
    """
    if measurement.saved_bytes <= budget:
        return RecomputeChoice("none", frozenset(), measurement.saved_bytes, 0)
    options = [_plan_selective(measurement, budget), *_module_choices(measurement)]
    fitting = [c for c in options if c.kept_bytes <= budget]
    if not fitting:
        return options[0]  # full: nothing fits
    return min(fitting, key=lambda c: (c.extra_flops, c.kept_bytes))


def _fill(
    candidates: list[OpRecord], first: list[OpRecord], kept: int, budget: int
) -> tuple[set[tuple[str, int]], int, int]:
    """Save ``first``, then every candidate (in order) that still fits: (keys, bytes, FLOPs)."""
    saved, kept_flops = set(), 0
    for r in [*first, *candidates]:
        if r.key not in saved and kept + r.output_bytes <= budget:
            kept += r.output_bytes
            kept_flops += r.flops
            saved.add(r.key)
    return saved, kept, kept_flops


def _plan_selective(measurement: BlockMeasurement, budget: int) -> RecomputeChoice:
    """The selective policy for ``budget``, or full recomputation if none fits.

    Which outputs to save is a 0/1 knapsack; filling by FLOPs per byte alone can keep a small
    output and miss a large one that alone saves far more (a 1 KiB product instead of a 64 KiB
    matmul). Also starting from the single output with the most FLOPs that fits, and taking
    the better of the two, keeps at least half the FLOPs the best choice would keep.
    """
    total = measurement.total_flops
    full = RecomputeChoice("full", frozenset(), measurement.input_bytes, total)
    forced = [r for r in measurement.ops if r.collective]
    kept = measurement.input_bytes + sum(r.output_bytes for r in forced)
    if kept > budget:
        return full
    candidates = [r for r in measurement.ops if r.savable]
    candidates.sort(key=lambda r: (-r.flops / r.output_bytes, r.output_bytes))
    starts: list[list[OpRecord]] = [[]]
    fitting = [r for r in candidates if kept + r.output_bytes <= budget]
    if fitting:
        starts.append([max(fitting, key=lambda r: (r.flops, -r.output_bytes))])
    fills = [_fill(candidates, first, kept, budget) for first in starts]
    saved, kept, kept_flops = max(fills, key=lambda f: (f[2], -f[1]))
    saved |= {r.key for r in forced}
    kept_flops += sum(r.flops for r in forced)
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
        self._context_fn: Callable | None = None

    # Eager even under torch.compile: the measurement is a dispatch mode, and the policy's
    # context function must exist before the traced call, which passes it to checkpoint
    # (Dynamo cannot trace a checkpoint whose context_fn is a closure made inside the graph).
    @torch.compiler.disable
    def _decide(self, args: tuple, kwargs: dict) -> None:
        self.measurement = measure_block(_ModuleView(self.inner, self.module), *args, **kwargs)
        # Under autocast the measuring forward cached this block's weight casts; the checkpointed
        # forward that follows would hit that cache while its recomputation (in backward, after
        # the cache is gone) casts again, and the selective policy's per-op call counts would
        # no longer line up. Drop the cache so both passes cast the same way.
        torch.clear_autocast_cache()
        budget = self.budget if isinstance(self.budget, int) else self.budget.share()
        self.choice = plan_recompute(self.measurement, budget)
        if self.choice.kind == "selective":
            self._context_fn = functools.partial(_keyed_policy, self.choice.saved)
        if isinstance(self.budget, _Budget):
            self.budget.spend(self.choice.kept_bytes)
        for name in self.choice.modules:  # checkpointed whole from this forward on
            child = self.module.get_submodule(name)
            child.forward = _checkpointed_forward(child.forward)
        self.module._forge_recompute = self.choice.describe()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.choice is None:
            if not torch.is_grad_enabled():
                return self.inner(*args, **kwargs)
            self._decide(args, kwargs)
        choice = self.choice
        if choice.kind in ("none", "modules"):
            return self.inner(*args, **kwargs)
        if choice.kind == "full":
            return checkpoint_block(self.inner, *args, **kwargs)
        return checkpoint_block(self.inner, *args, context_fn=self._context_fn, **kwargs)


def _checkpointed_forward(inner: Callable) -> Callable:
    # A closure (as recompute.py's ``modules=...``), so torch.compile traces a plain function.
    def forward(*args: Any, **kwargs: Any) -> Any:
        return checkpoint_block(inner, *args, **kwargs)

    return forward


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
