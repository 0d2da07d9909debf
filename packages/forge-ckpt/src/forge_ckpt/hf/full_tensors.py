"""The full tensors of a sharded or pipelined model, gathered one at a time for one writer.

Writing a whole-model file (a Hugging Face export) from a parallelized model needs each tensor
whole on one process. Gathering the whole state dict first (``get_model_state_dict(...,
full_state_dict=True)``, or every pipeline stage's state sent to every rank of the pipeline)
costs the model's size on that process; :func:`iter_full_tensors` instead gathers one tensor,
hands it to the writer and drops it before the next, so the writer's peak is about one tensor
(plus whatever the consumer keeps, e.g. the pending shard of
:func:`~forge_ckpt.hf.save_hf_checkpoint`).

- A ``DTensor`` (FSDP2, tensor / expert parallel shards) is gathered with ``full_tensor()``, a
  collective over its mesh: every rank holding a piece of it takes part, in the same order.
- With ``pipeline_group``, each rank holds only its stages' tensors. The ranks first exchange
  the names, global shapes and dtypes they hold (a small ``all_gather_object``); the lowest
  pipeline rank holding a name owns it (a tied embedding held by the first and the last
  stage is gathered once) and sends the gathered tensor to the writer point to point. The
  other pipeline groups' owners gather too (their peers in the stage's mesh need them to) but
  send nothing.

Every rank must consume the iterator to the end (it runs the collectives); only the writer
(global rank ``dst``) receives pairs, the others none. Without a process group (one process)
it yields the state's tensors as they are, detached and on the CPU.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["iter_full_tensors"]


@dataclass(frozen=True)
class _Entry:
    """One tensor of the whole model: its global shape, dtype and owning pipeline rank."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    owner: int


def _dtensor_type():
    # Importing torch.distributed.tensor costs seconds; before it is imported no DTensor exists.
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole on this rank (collective over its mesh for a ``DTensor``)."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(tensor, dtensor):
        return tensor.full_tensor().detach()
    return tensor.detach()


def _entries(state: Mapping[str, torch.Tensor], pipeline_group: Any) -> dict[str, _Entry]:
    """Every tensor of the pipeline (union over its ranks, first holder's order), owned by
    the lowest pipeline rank holding it. Collective over ``pipeline_group``."""
    import torch.distributed as dist

    local = [(name, tuple(t.shape), t.dtype) for name, t in state.items()]
    if pipeline_group is None:
        return {name: _Entry(shape, dtype, 0) for name, shape, dtype in local}
    gathered: list[Any] = [None] * dist.get_world_size(pipeline_group)
    dist.all_gather_object(gathered, local, group=pipeline_group)
    entries: dict[str, _Entry] = {}
    for owner, held in enumerate(gathered):
        for name, shape, dtype in held:
            first = entries.get(name)
            if first is None:
                entries[name] = _Entry(shape, dtype, owner)
            elif (first.shape, first.dtype) != (shape, dtype):
                raise ValueError(
                    f"{name} is {tuple(first.shape)} {first.dtype} on pipeline rank "
                    f"{first.owner} but {shape} {dtype} on pipeline rank {owner}: the stages "
                    "disagree about a tensor they share (a tied weight built differently?)"
                )
    return entries


def _transfer_device(state: Mapping[str, torch.Tensor]) -> torch.device:
    """Where point-to-point transfers live: the device of this rank's tensors (the pipeline
    group's backend serves it: gloo the CPU, NCCL the GPU)."""
    for tensor in state.values():
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def iter_full_tensors(
    state: Mapping[str, torch.Tensor],
    *,
    pipeline_group: Any = None,
    dst: int = 0,
    sort_key: Callable[[str], Any] | None = None,
    check: Callable[[list[str]], None] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor on the CPU)`` for every tensor of a parallelized model, one at a
    time, on global rank ``dst``; nothing on the other ranks (see the module docstring).

    Args:
        state: this rank's tensors by their whole-model names (plain tensors or ``DTensor``
            shards), e.g. ``get_model_state_dict(model)`` (sharded, not gathered).
        pipeline_group: the pipeline-parallel process group when each rank holds only some
            stages; ``None`` when every rank holds (pieces of) every tensor.
        dst: the global rank receiving the tensors.
        sort_key: the order to yield the names in (a stable sort of the pipeline's names,
            e.g. by their index in the unsplit model's state dict); default: pipeline rank 0's
            names first, then each next rank's new ones, each in its state's order. Every rank
            must pass the same key.
        check: called on every rank with the names to come, in order, before any tensor is
            gathered; an exception it raises (e.g. the writer's model lacks a name) stops all
            ranks together, where a failure in the middle of the stream would leave the other
            ranks waiting in a collective.

    Collective: every rank of the job calls it and consumes the iterator to the end.
    """
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    if pipeline_group is not None and not distributed:
        raise ValueError("pipeline_group given but torch.distributed is not initialized")
    entries = _entries(state, pipeline_group)
    names = list(entries)
    if sort_key is not None:
        names.sort(key=sort_key)
    if check is not None:
        check(names)
    rank = dist.get_rank() if distributed else dst
    pp_rank = 0 if pipeline_group is None else dist.get_rank(pipeline_group)
    with_writer = pipeline_group is None or dst in dist.get_process_group_ranks(pipeline_group)
    device = _transfer_device(state)
    for name in names:
        entry = entries[name]
        full = None
        if entry.owner == pp_rank:
            full = _full(state[name])
        if rank == dst:
            if full is None:  # another stage owns it: it sends it here
                full = torch.empty(entry.shape, dtype=entry.dtype, device=device)
                src = dist.get_global_rank(pipeline_group, entry.owner)
                dist.recv(full, src=src, group=pipeline_group)
            yield name, full.cpu()
        elif full is not None and pipeline_group is not None and with_writer:
            dist.send(full.to(device).contiguous(), dst=dst, group=pipeline_group)
        del full
