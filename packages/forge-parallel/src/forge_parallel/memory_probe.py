"""Bytes a forward keeps alive for its backward, measured rather than predicted.

:func:`kept_for_backward` runs a callable once with gradients under a ``TorchDispatchMode`` that
holds a weak reference to the storage of every tensor an op creates, drops what the callable
returned, and adds up the storages still alive while its autograd graph is: the tensors autograd
saved, the outputs a selective-checkpoint policy cached, the weight casts autocast cached.
Parameters and other tensors created before the call are not counted, except the callable's
tensor arguments (a block's input is kept by every recompute option, as
:func:`forge_parallel.measure_block` counts it). Offloaded activations sit on the host: pass
``device`` to count only the storages on the accelerator.

It serves the auto recompute tests (predicted against measured bytes) and
``benchmarks/bench_single_device.py`` (bytes kept per recompute setting), so both measure the
same way (Chen et al. 2016, "Training deep nets with sublinear memory cost", count memory the
same way: the activations alive at the end of the forward).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["CreatedStorages", "kept_for_backward"]


class CreatedStorages(TorchDispatchMode):
    """While active, weak references to the storage of every tensor an op allocates (not of
    views and in-place results, which share an input's storage: a parameter's transpose is no
    new memory). :meth:`alive_bytes` adds up those still referenced.

    ``with CreatedStorages() as probe: loss = model(ids)``, then ``probe.alive_bytes(exclude=
    (loss,))`` before ``loss.backward()``: the activations the step keeps for its backward.
    """

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {_ptr(t) for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            if _ptr(t) not in inputs:
                self.refs.append(weakref.ref(t.untyped_storage()))
        return out

    def alive_bytes(
        self,
        *,
        device: torch.device | str | None = None,
        include: Any = (),
        exclude: Any = (),
    ) -> int:
        """Bytes of the tracked storages still alive, plus the storages of the tensors in
        ``include`` (any pytree), minus those of ``exclude``. ``device``: count only storages
        on this device type (``"cuda"`` leaves out activations offloaded to the host)."""
        wanted = None if device is None else torch.device(device).type
        excluded = {_ptr(t) for t in _tensors(exclude)}
        storages = [ref() for ref in self.refs]
        storages += [t.untyped_storage() for t in _tensors(include)]
        alive: dict[int, int] = {}
        for storage in storages:
            if storage is None or storage.data_ptr() in excluded:
                continue
            if wanted is None or storage.device.type == wanted:
                alive[storage.data_ptr()] = storage.nbytes()
        return sum(alive.values())


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def kept_for_backward(
    fn: Callable[..., Any], *args: Any, device: torch.device | str | None = None, **kwargs: Any
) -> int:
    """Bytes that ``fn(*args, **kwargs)``'s autograd graph keeps alive once its outputs are
    dropped: storages created in the call and still referenced, plus the tensor arguments'.

    ``device``: count only storages on this device (e.g. ``"cuda"`` to leave out activations
    offloaded to the host); ``None`` counts all. The graph is freed on return (no backward runs).
    """
    with torch.enable_grad(), CreatedStorages() as probe:
        out = fn(*args, **kwargs)
    # Hold the graph (its nodes keep the saved tensors), not the outputs themselves.
    graph = [t.grad_fn for t in _tensors(out)]
    del out
    kept = probe.alive_bytes(device=device, include=(args, kwargs))
    del graph
    return kept
