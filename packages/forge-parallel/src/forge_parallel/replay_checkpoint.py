"""Non-reentrant activation checkpointing whose recomputation runs under the forward's
``TorchFunctionMode`` s.

``torch.utils.checkpoint`` replays a block's forward during backward, outside whatever
function modes were active when the block first ran. Context parallelism answers the model's
``scaled_dot_product_attention`` calls with ring / Ulysses attention from such a mode
(:mod:`forge_parallel.context_parallel.apply`), so a plain replay would compute each rank's
attention over its own shard only, and torch would stop on the mismatch of the recomputed
tensors. :func:`checkpoint_block` captures the modes active at the forward (innermost last) and
re-enters the same mode objects around the recomputation (they carry their state, e.g. the
micro-batch's document boundaries, which a later micro-batch's forward does not change), ahead
of the checkpoint's own recompute context (a selective policy's).

:func:`recomputed_whole` runs a group of ops as one unit that a selective policy never splits:
the context-parallel attention (ring exchanges or all-to-alls around the attention core), whose
receive buffers are filled in place and whose collectives must run the same way on every rank.
Op by op, a policy would cache some of its buffers (later overwritten by the exchanges) and
skip some of its collectives in the recomputation but not others: the ranks deadlock. As one
unit it is recomputed whole, its exchanges included, in the same order on every rank: the
attention core is what selective recomputation (Korthikanti et al. 2022, arXiv:2205.05198)
recomputes, and its inputs, the projections' outputs, are what the policy keeps.

The recomputation also runs from the module state the forward it replays started from, and
leaves none of its own writes behind (:class:`_StateReplay`): a forward that updates state
(BatchNorm's running statistics and ``num_batches_tracked``, an EMA or counter buffer a user's
block writes in place, a Python counter) would otherwise update it twice per step, and a
forward that reads what it wrote would be recomputed from the later values (other outputs,
wrong gradients). ``torch.utils.checkpoint`` documents the double update and leaves it to the
user; forge's recompute is applied to models it did not write (a CNN encoder with BatchNorm).
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.checkpoint import checkpoint

__all__ = ["checkpoint_block", "recomputed_whole"]


#: ``checkpoint(respect_saved_tensors_hooks=...)`` (torch >= 2.15): whether the outputs a
#: selective policy caches go through the ``saved_tensors_hooks`` active around the block.
#: Forge passes ``False``: activation offload (:mod:`forge_parallel.offload`) documents that
#: those outputs stay on the device, and without an explicit choice PyTorch warns on every
#: call under offload that its default will change.
_HOOKS_ARGUMENT = "respect_saved_tensors_hooks" in inspect.signature(checkpoint).parameters


def _active_function_modes() -> tuple[Any, ...]:
    from torch.overrides import _get_current_function_mode_stack

    return tuple(_get_current_function_mode_stack())


#: The attribute types of a module whose values a recomputation gets from the forward it
#: replays and puts back afterwards (a call counter, a "first call done" flag), as auto
#: recompute's measurement does (:func:`forge_parallel.auto_recompute.measure_block`).
_SCALARS = (int, float, bool)

#: Per checkpointed module, the paths (``"norm.running_mean"``) of the buffers one of its
#: checkpointed forwards wrote or reassigned: a later forward copies just these before it runs.
#: Its first forward copies every buffer (it cannot know yet which it writes).
_WRITTEN: weakref.WeakKeyDictionary[nn.Module, frozenset[str]] = weakref.WeakKeyDictionary()


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (its writes, versions and copies stay on this rank), else ``t``."""
    return getattr(t, "_local_tensor", t)


class _StateReplay:
    """The state of ``module`` that one checkpointed forward updated, and the context its
    recomputation runs in: from the values that forward started from, put back afterwards.

    Made just before the forward (outside the checkpoint, so outside a selective policy's
    dispatch modes: its copies are no op the policy caches or counts) and finished just after
    it (:meth:`finish`). What the forward updated is found without a dispatch mode: a buffer
    (of ``module`` or a submodule; a DTensor's local shard) whose ``_version`` moved was
    written in place (``add_``, ``copy_``); the running statistics of a BatchNorm /
    InstanceNorm in training are written (by an op whose schema does not say so: ``_version``
    stays); on the first forward, a buffer whose values changed was written (any other such
    op); a buffer slot holding another tensor was reassigned (``self.ema = self.ema * m + x``);
    an ``int`` / ``float`` / ``bool`` attribute of a submodule holding another object was set
    (a call counter, a "first call done" flag).

    The buffers are copied before the forward, so the recomputation starts from the same
    values and reads what the forward read (a forward that reads its updated counter is
    recomputed bit for bit): on the first forward of ``module`` all of them (it cannot know yet
    which it writes), later only those an earlier forward wrote (:data:`_WRITTEN`) and the
    norms' running statistics, usually a few small ones; copies of what a forward did not
    write are dropped when it returns. (A buffer first written in place by a later forward is
    undone after its recomputation all the same, but that recomputation reads the written
    value.) Around the recomputation the current values are set aside, the start values put
    in, and the current ones put back afterwards, also when the checkpoint stops the
    recomputation early: what changed between the forward and the backward (the next
    micro-batch's forward) is kept, the replay's own writes vanish. These copies write through
    ``.data``, which moves no version counter: neither a selective policy's check of the
    outputs it cached nor autograd's check of saved tensors takes the restore for a write.
    FP8 delayed scaling casts a replay with its forward's scales and records nothing
    (``forge_kernels.fp8.DelayedScalingState.begin_forward``): its history comes back as is.

    Not covered: parameters (written by the optimizer and FSDP's all-gathers, not by a
    forward), tensors outside ``module`` (a global, an input), Python containers the forward
    changes (a list it appends to) and buffers it registers.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._known = known = _WRITTEN.get(module)
        # One pass over the submodules: this runs on every forward of every checkpointed block.
        self._slots: list[tuple[str, nn.Module, str, torch.Tensor]] = []
        self._norms: set[str] = set()
        self._scalars: list[tuple[nn.Module, dict[str, Any]]] = []
        for path, m in module.named_modules():
            prefix = f"{path}." if path else ""
            for name, tensor in m._buffers.items():
                if tensor is not None and not tensor.is_inference():
                    self._slots.append((prefix + name, m, name, tensor))
            if isinstance(m, _NormBase) and m.training and m.track_running_stats:
                self._norms.update((f"{prefix}running_mean", f"{prefix}running_var"))
            self._scalars.append((m, {k: v for k, v in vars(m).items() if type(v) in _SCALARS}))
        self._versions = [_local(t)._version for *_, t in self._slots]
        copied = None if known is None else known | self._norms
        self._start: dict[str, torch.Tensor] = {}
        if self._slots and (copied is None or copied):
            with torch.no_grad():
                self._start = {
                    path: _local(t).clone()
                    for path, _, _, t in self._slots
                    if copied is None or path in copied
                }
        self.tensors: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # (buffer, start)
        self.slots: list[tuple[nn.Module, str, torch.Tensor]] = []  # (owner, name, start)
        self.scalars: list[tuple[nn.Module, str, Any]] = []  # (module, name, start)
        self._entered: list[tuple[list, list, list]] = []

    def finish(self) -> None:
        """Note what the forward that just ran updated; drop the copies of what it did not."""
        written = set(self._norms)
        for (path, owner, name, tensor), version in zip(self._slots, self._versions, strict=True):
            local = _local(tensor)
            if owner._buffers.get(name) is not tensor:
                self.slots.append((owner, name, tensor))
                written.add(path)
            start = self._start.get(path)
            if local._version != version or (
                self._known is None and path not in written and not torch.equal(local, start)
            ):
                written.add(path)
        restored = written | (self._known or frozenset())
        if self._known is None or not written <= self._known:
            _WRITTEN[self.module] = frozenset(restored)
        seen: set[int] = set()
        for path, _, _, tensor in self._slots:
            local = _local(tensor)
            if path in restored and id(local) not in seen:
                seen.add(id(local))
                self.tensors.append((local, self._start.get(path)))
        self.scalars = [
            (m, k, v)
            for m, values in self._scalars
            for k, v in values.items()
            if vars(m).get(k, v) is not v
        ]
        del self._slots, self._versions, self._start, self._scalars, self._norms

    def __enter__(self) -> None:
        # Re-entrant: a graph back-propagated twice (retain_graph) is recomputed twice.
        with torch.no_grad():
            tensors = [(t, t.clone()) for t, _ in self.tensors]
            for t, start in self.tensors:
                if start is not None:
                    t.data.copy_(start)
        slots = [(owner, name, owner._buffers.get(name)) for owner, name, _ in self.slots]
        for owner, name, start in self.slots:
            owner._buffers[name] = start
        scalars = [(m, k, vars(m).get(k)) for m, k, _ in self.scalars]
        for m, k, start in self.scalars:
            vars(m)[k] = start
        self._entered.append((tensors, slots, scalars))

    def __exit__(self, *exc: object) -> bool:
        tensors, slots, scalars = self._entered.pop()
        with torch.no_grad():
            for t, current in tensors:
                t.data.copy_(current)
        for owner, name, current in slots:
            owner._buffers[name] = current
        for m, k, current in scalars:
            vars(m)[k] = current
        return False


class _Entered:
    """Enters ``contexts`` in order (the first outermost) each time it is entered."""

    def __init__(self, *contexts: Any) -> None:
        self.contexts = contexts
        self._stacks: list[contextlib.ExitStack] = []

    def __enter__(self) -> None:
        with contextlib.ExitStack() as stack:
            for context in self.contexts:
                stack.enter_context(context)
            self._stacks.append(stack.pop_all())

    def __exit__(self, *exc: Any) -> bool | None:
        return self._stacks.pop().__exit__(*exc)


def _replaying(
    modes: tuple[Any, ...], context_fn: Callable | None, state: _StateReplay | None
) -> Callable:
    """The checkpoint's ``context_fn``: ``context_fn``'s forward context, and its recompute
    context entered inside ``state`` (outermost: its copies run outside every mode) and the
    forward's function modes (outermost first, as they were entered)."""

    def contexts():
        if context_fn is None:
            forward, recompute = contextlib.nullcontext(), contextlib.nullcontext()
        else:
            forward, recompute = context_fn()
        outer = () if state is None else (state,)
        return forward, _Entered(*outer, *modes, recompute)

    return contexts


def _state_owner(function: Callable, state_module: nn.Module | None) -> nn.Module | None:
    if state_module is not None:
        return state_module
    owner = getattr(function, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def checkpoint_block(
    function: Callable,
    *args: Any,
    context_fn: Callable | None = None,
    state_module: nn.Module | None = None,
    **kwargs: Any,
) -> Any:
    """``torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, ...)`` with
    the function modes of this call re-entered around the recomputation, which runs from the
    module state this forward started from and leaves none of its writes behind (see the
    module docstring). ``state_module``: the module whose state that is; by default
    ``function``'s (a module's bound ``forward``). Under ``torch.compile`` nothing is captured:
    a compiled region traces the modes it runs under itself, and its recomputation is
    AOTAutograd's functional replay, which applies a buffer update once. With a
    ``context_fn`` (a selective policy), the outputs it caches bypass the
    ``saved_tensors_hooks`` around the call (``respect_saved_tensors_hooks=False`` where this
    torch has the argument; the behaviour of older ones)."""
    state: _StateReplay | None = None
    modes: tuple[Any, ...] = ()
    if not torch.compiler.is_compiling():
        modes = _active_function_modes()
        owner = _state_owner(function, state_module)
        if owner is not None and torch.is_grad_enabled():  # (no grad: nothing is recomputed)
            state = _StateReplay(owner)
    hooks = {"respect_saved_tensors_hooks": False} if _HOOKS_ARGUMENT and context_fn else {}
    if modes or state is not None:
        context_fn = _replaying(modes, context_fn, state)
    if context_fn is None:
        return checkpoint(function, *args, use_reentrant=False, **kwargs)
    out = checkpoint(function, *args, use_reentrant=False, context_fn=context_fn, **hooks, **kwargs)
    if state is not None:
        state.finish()
    return out


def _is_selective_checkpoint_mode(mode: Any) -> bool:
    """A selective checkpoint's caching (forward) or cached (recomputation) dispatch mode, or a
    mode that sees ops as such a policy does (``sees_ops_like_selective_checkpoint``: auto
    recompute's measurement, whose per-op keys must match its policy's)."""
    from torch.utils import checkpoint as torch_checkpoint

    kinds = tuple(
        getattr(torch_checkpoint, name)
        for name in ("_CachingTorchDispatchMode", "_CachedTorchDispatchMode")
        if hasattr(torch_checkpoint, name)
    )
    return isinstance(mode, kinds) or getattr(mode, "sees_ops_like_selective_checkpoint", False)


@contextlib.contextmanager
def recomputed_whole() -> Iterator[None]:
    """Run the ops inside as one unit that selective activation checkpointing recomputes whole
    (see the module docstring): the selective checkpoint dispatch modes on top of the mode
    stack are taken off while it runs, so the policy neither caches nor counts its ops; in
    the forward nothing inside is kept by the policy, in the recomputation all of it runs
    again. Outside a selective checkpoint this does nothing."""
    from torch.utils._python_dispatch import (
        _get_current_dispatch_mode_stack,
        _pop_mode_temporarily,
    )

    stack = _get_current_dispatch_mode_stack()
    top = len(stack)
    while top and _is_selective_checkpoint_mode(stack[top - 1]):
        top -= 1
    if any(_is_selective_checkpoint_mode(mode) for mode in stack[:top]):
        raise RuntimeError(
            "a selective activation checkpoint is active under another dispatch mode "
            f"({type(stack[-1]).__name__}) entered inside the checkpointed block; the "
            "context-parallel attention cannot run outside its policy there. Enter that mode "
            "outside the checkpointed block, or use full recompute"
        )
    with contextlib.ExitStack() as popped:
        for _ in range(len(stack) - top):
            popped.enter_context(_pop_mode_temporarily())
        yield
