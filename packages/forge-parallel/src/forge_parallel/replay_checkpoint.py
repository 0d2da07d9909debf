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
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
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


@contextlib.contextmanager
def _entered(modes: tuple[Any, ...], inner: contextlib.AbstractContextManager) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for mode in modes:  # outermost first, as they were entered
            stack.enter_context(mode)
        stack.enter_context(inner)
        yield


def _replaying(modes: tuple[Any, ...], context_fn: Callable | None) -> Callable:
    def contexts():
        if context_fn is None:
            forward, recompute = contextlib.nullcontext(), contextlib.nullcontext()
        else:
            forward, recompute = context_fn()
        return forward, _entered(modes, recompute)

    return contexts


def checkpoint_block(
    function: Callable, *args: Any, context_fn: Callable | None = None, **kwargs: Any
) -> Any:
    """``torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, ...)`` with
    the function modes of this call re-entered around the recomputation (see the module
    docstring). Under ``torch.compile`` nothing is captured (a compiled region traces the
    modes it runs under itself). With a ``context_fn`` (a selective policy), the outputs it
    caches bypass the ``saved_tensors_hooks`` around the call (``respect_saved_tensors_hooks=
    False`` where this torch has the argument; the behaviour of older ones)."""
    if not torch.compiler.is_compiling():
        modes = _active_function_modes()
        if modes:
            context_fn = _replaying(modes, context_fn)
    if context_fn is None:
        return checkpoint(function, *args, use_reentrant=False, **kwargs)
    hooks = {"respect_saved_tensors_hooks": False} if _HOOKS_ARGUMENT else {}
    return checkpoint(
        function, *args, use_reentrant=False, context_fn=context_fn, **hooks, **kwargs
    )


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
