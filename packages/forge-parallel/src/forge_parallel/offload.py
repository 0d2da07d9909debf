"""Activation offload: the tensors each block saves for backward wait in host memory.

Built on ``torch.autograd.graph.saved_tensors_hooks``: during a block's forward, every tensor
autograd saves (of at least ``OffloadConfig.min_bytes``, and not a parameter) is packed into a
host copy; backward unpacks it back to its device. On an accelerator (the approach of
torchtune's ``OffloadActivations`` and Megatron-Core's CPU offloading):

- forward copies device -> host on a side stream into pinned buffers, so the copy overlaps the
  next ops; the allocator may reuse the device memory once the copy has run
  (``record_stream``);
- backward copies host -> device on another side stream. Blocks run backward in reverse
  order, so when block ``i`` first unpacks, the copies of block ``i - 1`` are started
  (``prefetch``), and they overlap block ``i``'s backward.

On a CPU device the "offload" is a copy into separate host buffers: correct, and the
bookkeeping (:attr:`ActivationOffload.stats`) shows what would move, but it saves no memory.

One activation is often saved by several autograd nodes (a norm's output by the q, k and v
projections; a tensor and its reshaped view by two matmuls). Within a block's forward each is
copied once: a saved tensor with the storage, offset, element count, dtype and version (no
in-place write in between) of one already copied, and the same strides or both contiguous,
shares that copy (15-18% fewer bytes moved on the tiny Llama blocks measured;
:attr:`OffloadStats.shared`).

Tensor / sequence parallelism: autograd saves DTensors there (the inputs of the column- and
row-parallel matmuls). Their local shard is what moves (``to_local`` outside autograd: the
DTensor's own local tensor, never a communication, for every placement, ``Partial`` included:
its unreduced values are copied as they are). Unpack wraps the reloaded shard in a DTensor with
the saved tensor's own spec (mesh, placements, global shape and stride), built directly (no
``from_local``: no autograd node, no collective); :attr:`OffloadStats.offloaded_dtensor_bytes`.
A pending functional collective's result (``AsyncCollectiveTensor``: a row-parallel output
after its all-reduce or reduce-scatter) is waited for and its values moved; other tensor
subclasses (float8 tensors) stay on the device (:attr:`OffloadStats.kept_subclasses`). Copy
sharing works on the local shards; each saved DTensor keeps its own spec, so views with other
placements share a copy exactly.

Composes with recomputation: applied outside a fully checkpointed block, the offloaded tensors
are the block inputs the checkpoint keeps (non-reentrant checkpointing saves them through the
active hooks). The outputs a selective recompute policy caches stay on the device.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from forge_parallel.config import OffloadConfig

__all__ = ["ActivationOffload", "OffloadStats", "apply_offload"]


@dataclass
class OffloadStats:
    """Bookkeeping of the pack / unpack hooks, in bytes and tensor counts."""

    packed: int = 0  # tensors seen by the pack hook
    offloaded: int = 0  # tensors copied to the host
    offloaded_bytes: int = 0  # local bytes for DTensors: what actually moves
    offloaded_dtensor_bytes: int = 0  # of which DTensor shards (tensor-parallel activations)
    kept_bytes: int = 0  # saved activations left on the device (small ones, subclasses)
    kept_subclasses: int = 0  # kept as tensor subclasses other than DTensor (float8 tensors)
    reloaded: int = 0  # host copies brought back by backward
    prefetched: int = 0  # of which started ahead of need
    shared: int = 0  # saved tensors that reused a copy made for an earlier one (no new copy)
    shared_bytes: int = 0


def _split(tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """``(local shard, spec)`` of a DTensor, ``(tensor, None)`` of a plain tensor.

    Under ``no_grad`` ``to_local`` returns the DTensor's own local tensor: no autograd node, no
    communication, whatever the placements (a ``Partial`` shard holds its unreduced values).
    """
    if not hasattr(tensor, "to_local"):
        return tensor, None
    with torch.no_grad():
        return tensor.to_local(), tensor._spec


def _plain(tensor: torch.Tensor) -> torch.Tensor | None:
    """The plain tensor holding ``tensor``'s values, or ``None`` for a tensor subclass that
    cannot be offloaded as one.

    A functional collective's result (``AsyncCollectiveTensor``: a row-parallel projection's
    output) is waited for: the op saving it reads it, so waits for it, anyway.
    """
    if type(tensor) in (torch.Tensor, nn.Parameter):
        return tensor
    if torch.distributed.is_available():
        from torch.distributed._functional_collectives import AsyncCollectiveTensor

        if isinstance(tensor, AsyncCollectiveTensor):
            return tensor.trigger_wait()
    return None


def _as_dtensor(local: torch.Tensor, spec: Any) -> torch.Tensor:
    """The DTensor ``spec`` describes, over ``local``: the constructor DTensor's own ops use,
    so no autograd node and no collective (``from_local`` would add both possibilities)."""
    from torch.distributed.tensor import DTensor

    return DTensor(local, spec, requires_grad=False)


class _Offloaded:
    """One tensor's host copy, and its device copy once backward has asked for it, held until
    each of the ``users`` saved tensors sharing the copy has been unpacked."""

    __slots__ = ("device", "event", "host", "reload_event", "reloaded", "source", "users")

    def __init__(self, host: torch.Tensor, device: torch.device, event: Any, source: Any) -> None:
        self.host, self.device, self.event = host, device, event
        self.reloaded: torch.Tensor | None = None
        self.reload_event: Any = None
        self.source = source  # weak reference to the device storage copied
        self.users = 1


class _SavedView:
    """What the pack hook returns for an offloaded tensor: its copy, the shape to view the
    copy as when the tensor was a contiguous reshape of the copied one (``None``: as copied),
    and for a DTensor its spec (the copy holds its local shard)."""

    __slots__ = ("copy", "shape", "spec")

    def __init__(self, copy: _Offloaded, shape: torch.Size | None = None, spec: Any = None) -> None:
        self.copy, self.shape, self.spec = copy, shape, spec


class _Group:
    """The saved tensors of one forward call of one block, and its copies by what they hold."""

    __slots__ = ("by_memory", "copies")

    def __init__(self) -> None:
        self.copies: list[_Offloaded] = []
        # memory key -> (copy, the copied tensor's shape, strides, contiguity)
        self.by_memory: dict[tuple, tuple[_Offloaded, torch.Size, tuple, bool]] = {}


def _memory_key(t: torch.Tensor) -> tuple:
    # The version counter keeps a copy from standing in for data written in place since.
    storage = t.untyped_storage()
    return (storage.data_ptr(), t.storage_offset(), t.numel(), t.dtype, t._version)


class ActivationOffload:
    """Saved-tensor hooks shared by the blocks of one model (one stream pair, one prefetcher).

    :meth:`block_forward` wraps a block's ``forward``; each forward call of a block is a
    *group* of saved tensors, and backward of group ``g`` prefetches group ``g - 1``.
    """

    def __init__(self, config: OffloadConfig, first_block: nn.Module) -> None:
        self.config = config
        self._first = first_block  # its forward starts a new pass of the model
        self.stats = OffloadStats()
        self._groups: list[_Group] = []
        self._streams: tuple[Any, Any] | None = None

    # -- streams ----------------------------------------------------------------------------
    def _side_streams(self, device: torch.device) -> tuple[Any, Any] | None:
        if device.type != "cuda":
            return None
        if self._streams is None:
            self._streams = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return self._streams

    # -- hooks ------------------------------------------------------------------------------
    def _shared(self, group: _Group, tensor: torch.Tensor) -> _SavedView | None:
        """A view of a copy this forward already made of the same memory, if one serves."""
        found = group.by_memory.get(_memory_key(tensor))
        if found is None:
            return None
        copy, shape, stride, contiguous = found
        if copy.source() is not tensor.untyped_storage():
            return None  # that storage was freed and the address reused
        if shape == tensor.shape and stride == tensor.stride():
            return _SavedView(copy)
        if contiguous and tensor.is_contiguous():
            return _SavedView(copy, tensor.shape)
        return None

    def _pack(self, group: _Group, params: set[int], saved: torch.Tensor) -> Any:
        self.stats.packed += 1
        local, spec = _split(saved)  # a DTensor's local shard is what moves
        tensor = _plain(local)
        if tensor is not None and tensor.untyped_storage().data_ptr() in params:
            return saved  # a weight: not an activation, alive anyway
        nbytes = local.numel() * local.element_size()
        if nbytes < self.config.min_bytes:
            self.stats.kept_bytes += nbytes
            return saved
        if tensor is None:  # e.g. a float8 tensor: a copy would lose what its subclass adds
            self.stats.kept_bytes += nbytes
            self.stats.kept_subclasses += 1
            return saved
        shared = self._shared(group, tensor)
        if shared is not None:
            shared.copy.users += 1
            shared.spec = spec
            self.stats.shared += 1
            self.stats.shared_bytes += nbytes
            return shared
        streams = self._side_streams(tensor.device)
        pin = self.config.pin_memory and streams is not None
        host = torch.empty_like(tensor, device="cpu", pin_memory=pin)
        event = None
        if streams is not None:
            d2h = streams[0]
            d2h.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(d2h):
                host.copy_(tensor, non_blocking=True)
                event = torch.cuda.Event()
                event.record(d2h)
            tensor.record_stream(d2h)  # device memory reusable only after the copy
        else:
            host.copy_(tensor)
        copy = _Offloaded(host, tensor.device, event, weakref.ref(tensor.untyped_storage()))
        group.copies.append(copy)
        # The tensor's layout, not the tensor: a reference would keep its device memory.
        layout = (tensor.shape, tensor.stride(), tensor.is_contiguous())
        group.by_memory[_memory_key(tensor)] = (copy, *layout)
        self.stats.offloaded += 1
        self.stats.offloaded_bytes += nbytes
        if spec is not None:
            self.stats.offloaded_dtensor_bytes += nbytes
        return _SavedView(copy, spec=spec)

    def _start_reload(self, handle: _Offloaded) -> None:
        if handle.reloaded is not None:
            return
        streams = self._side_streams(handle.device)
        if streams is None:
            handle.reloaded = handle.host.to(handle.device, copy=True)
            return
        h2d = streams[1]
        with torch.cuda.stream(h2d):
            h2d.wait_event(handle.event)
            handle.reloaded = handle.host.to(handle.device, non_blocking=True)
            handle.reload_event = torch.cuda.Event()
            handle.reload_event.record(h2d)

    def _unpack(self, groups: list[_Group], index: int, packed: Any) -> torch.Tensor:
        """Reload ``packed``; on the way, start the copies of ``groups[index - 1]``: the
        block that runs backward next *in the same forward pass*. ``groups`` is that pass's
        list, captured at forward time: with several micro-batches in flight (pipeline 1F1B:
        F1 F2 B1 B2) ``self._groups`` already holds a later pass, whose copies must stay on the
        host until its own backward."""
        if not isinstance(packed, _SavedView):
            return packed
        if self.config.prefetch and index > 0:
            for copy in groups[index - 1].copies:
                if copy.reloaded is None and copy.users > 0:
                    self._start_reload(copy)
                    self.stats.prefetched += 1
        copy = packed.copy
        self._start_reload(copy)
        tensor = copy.reloaded
        if copy.reload_event is not None:
            current = torch.cuda.current_stream(copy.device)
            current.wait_event(copy.reload_event)
            tensor.record_stream(current)
        copy.users -= 1
        if copy.users == 0:  # its last saved tensor: the graph holds the device copy now
            copy.reloaded = None
            self.stats.reloaded += 1
        if packed.shape is not None:
            tensor = tensor.view(packed.shape)
        return tensor if packed.spec is None else _as_dtensor(tensor, packed.spec)

    def block_forward(self, inner: Callable, module: nn.Module) -> Callable:
        """``inner`` (a block's forward) with its saved tensors offloaded."""

        def forward(*args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return inner(*args, **kwargs)
            params = {
                plain.untyped_storage().data_ptr()
                for plain in (_plain(_split(p)[0]) for p in module.parameters())
                if plain is not None
            }
            group = _Group()
            if module is self._first:
                self._groups = []  # a new forward pass of the model
            groups = self._groups  # this pass's list: the next pass replaces the attribute
            index = len(groups)
            groups.append(group)
            with torch.autograd.graph.saved_tensors_hooks(
                lambda t: self._pack(group, params, t),
                lambda packed: self._unpack(groups, index, packed),
            ):
                return inner(*args, **kwargs)

        return forward


def apply_offload(
    blocks: Sequence[tuple[str, nn.Module]], config: OffloadConfig
) -> tuple[ActivationOffload, dict[str, str]]:
    """Offload the saved activations of ``blocks`` (in place, outside any recompute wrapper).

    Returns the shared :class:`ActivationOffload` (its ``stats``) and name -> description.
    """
    if not blocks:
        raise ValueError("activation offload needs the model's blocks; pass blocks='<pattern>'")
    offload = ActivationOffload(config, blocks[0][1])
    applied: dict[str, str] = {}
    for name, block in blocks:
        if getattr(block, "_forge_offload", None):
            raise ValueError(f"{name} already offloads its activations; apply offload once")
        block.forward = offload.block_forward(block.forward, block)
        block._forge_offload = offload
        applied[name] = "offload to CPU"
    return offload, applied
