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
of the checkpoint's own recompute context (a selective policy's). A mode that marks itself
``refuses_selective_recompute`` (the context-parallel router) refuses a selective policy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["checkpoint_block"]


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
    modes it runs under itself)."""
    if not torch.compiler.is_compiling():
        modes = _active_function_modes()
        if context_fn is not None and any(
            getattr(mode, "refuses_selective_recompute", False) for mode in modes
        ):
            raise ValueError(
                "selective activation recomputation under context parallelism is not supported "
                "yet: its policy caches buffers that the context-parallel exchanges fill in "
                "place. Use full recompute (RecomputeConfig(mode='full')) or none"
            )
        if modes:
            context_fn = _replaying(modes, context_fn)
    if context_fn is None:
        return checkpoint(function, *args, use_reentrant=False, **kwargs)
    return checkpoint(function, *args, use_reentrant=False, context_fn=context_fn, **kwargs)
