"""Optimizers that step flat slices of the model's parameters (ZeRO-1/2), saved by parameter name.

ZeRO stages 1 and 2 (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training
Trillion Parameter Models"; ``forge_parallel.ZeroOptimizer``) flatten each bucket of parameters
into one buffer (the parameters become views of it) and have each data-parallel rank step one
contiguous slice of that buffer (a view too), keeping optimizer state for that slice only.
DCP's ``get_state_dict`` names optimizer state by parameter and cannot name such a slice.

Here the slice's state is cut, per parameter it overlaps, into boxes of that parameter's
shape (a contiguous range of a row-major tensor is at most ``2 * ndim - 1`` boxes: a partial
row, whole rows, a partial row, recursively), and saved as a ``ShardedTensor`` of those boxes
(views of the state, no copy) under the names and shapes a plain optimizer of the whole model
has (``state.<fqn>.exp_avg``, ``param_groups.<fqn>.lr``). So a ZeRO checkpoint loads into a
plain optimizer in one process, into FSDP, or into ZeRO at any world size (whose slices read
their boxes back in place). Scalar state (Adam's ``step``) is one value per parameter, as a
plain optimizer stores it.

Which slice covers which parameter is found from the tensors alone: an optimizer parameter
that is not a model parameter but shares the storage of model parameters covers the elements
of theirs that its storage range overlaps. An optimizer parameter that overlaps none (e.g.
float32 master copies of bfloat16 parameters, which own their storage) cannot be named and
raises an error saying so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "FlatSegment",
    "apply_param_groups",
    "flat_segments",
    "flat_state_dict",
    "init_flat_state",
    "row_major_boxes",
    "stage",
]


def row_major_boxes(
    shape: tuple[int, ...], start: int, length: int
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """``(offsets, sizes)`` boxes covering elements ``[start, start + length)`` of a row-major
    tensor of ``shape``, in order; each box is a contiguous range of the flattened tensor."""
    if length <= 0:
        return []
    if len(shape) <= 1:
        return [((start,), (length,))] if shape else [((), ())]
    row = math.prod(shape[1:])
    stop = start + length
    first, last = start // row, (stop - 1) // row

    def within(i: int, lo: int, hi: int):
        return [((i, *o), (1, *s)) for o, s in row_major_boxes(shape[1:], lo, hi - lo)]

    if first == last:
        return within(first, start - first * row, stop - first * row)
    boxes = []
    full_from, full_to = -(-start // row), stop // row  # whole rows [full_from, full_to)
    if start % row:
        boxes += within(first, start % row, row)
    if full_to > full_from:
        rows = full_to - full_from
        boxes.append(((full_from, *[0] * (len(shape) - 1)), (rows, *shape[1:])))
    if stop % row:
        boxes += within(last, 0, stop % row)
    return boxes


@dataclass(frozen=True)
class FlatSegment:
    """Elements ``[param_start, param_start + length)`` of model parameter ``fqn`` (flattened)
    are elements ``[opt_start, ...)`` of optimizer parameter ``opt_param``."""

    fqn: str
    shape: tuple[int, ...]
    param_start: int
    opt_param: torch.Tensor
    opt_start: int
    length: int

    def boxes(self) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
        """``(offsets, sizes, start in the optimizer parameter)`` of each box."""
        out, at = [], self.opt_start
        for offsets, sizes in row_major_boxes(self.shape, self.param_start, self.length):
            out.append((offsets, sizes, at))
            at += math.prod(sizes)
        return out


def _storage_key(t: torch.Tensor) -> tuple[int, torch.dtype, torch.device]:
    return (t.untyped_storage().data_ptr(), t.dtype, t.device)


def flat_segments(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[FlatSegment] | None:
    """How ``optimizer``'s parameters cover the model's, or ``None`` when it steps the model's
    parameters themselves (the ordinary case, which DCP's ``get_state_dict`` handles). An
    optimizer that says it steps flat slices (``steps_flat_slices = True``) but owns none on
    this rank gives ``[]``.

    Raises ``ValueError`` for an optimizer parameter that is neither a model parameter nor a
    flat view of model parameters (see the module docstring)."""
    params = dict(model.named_parameters())
    own = {id(p) for p in params.values()}
    opt_params = [p for g in optimizer.param_groups for p in g["params"]]
    foreign = [p for p in opt_params if id(p) not in own]
    if not foreign:
        # A flat optimizer owning no slice here (forge_parallel.ZeroOptimizer on a frozen
        # pipeline stage) still joins the collectives of the others' flat save and load.
        return [] if getattr(optimizer, "steps_flat_slices", False) else None
    if len(foreign) != len(opt_params):
        raise ValueError(
            f"{type(optimizer).__name__} steps some model parameters and some other tensors; "
            "a checkpoint names optimizer state by model parameter, so an optimizer must step "
            "either the model's parameters or flat views of them (ZeRO-1/2), not a mix"
        )
    by_storage: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
    for fqn, p in params.items():
        if p.is_contiguous():
            by_storage.setdefault(_storage_key(p), []).append((fqn, p))
    segments = []
    for opt_param in foreign:
        lo = opt_param.storage_offset()
        hi = lo + opt_param.numel()
        found = False
        for fqn, p in (
            by_storage.get(_storage_key(opt_param), []) if opt_param.is_contiguous() else []
        ):
            p_lo = p.storage_offset()
            a, b = max(lo, p_lo), min(hi, p_lo + p.numel())
            if a < b:
                found = True
                segments.append(
                    FlatSegment(fqn, tuple(p.shape), a - p_lo, opt_param, a - lo, b - a)
                )
        if not found and opt_param.numel():
            raise ValueError(
                f"{type(optimizer).__name__} steps a tensor of shape {tuple(opt_param.shape)} "
                f"({opt_param.dtype}) that is not a model parameter and shares no memory with "
                "one, so its state cannot be saved by parameter name. A ZeRO optimizer with "
                "master copies in another dtype (bfloat16 parameters, float32 master) is such a "
                "case: train with parameters in the master dtype, or use data_parallel='fsdp'"
            )
    return segments


def _sharded(
    global_shape: tuple[int, ...],
    local: list[tuple[tuple[int, ...], tuple[int, ...], torch.Tensor]],
    all_boxes: list[tuple[int, tuple[int, ...], tuple[int, ...]]],
    dtype: torch.dtype,
    group,
):
    """A ``ShardedTensor`` of ``local`` boxes (views), all ranks' boxes in its metadata.

    A box several ranks hold (a parameter several pipeline stages hold, e.g. a tied embedding
    and head, sharded alike with equal state by each stage's ZeRO optimizer) is listed once,
    as this rank's where it holds it: DCP writes it once and reads it into every copy."""
    import torch.distributed as dist
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
    from torch.distributed._shard.sharded_tensor.metadata import (
        ShardedTensorMetadata,
        TensorProperties,
    )

    device = local[0][2].device.type if local else "cpu"
    me = dist.get_rank(group)
    listed: set[tuple] = set()
    metas = []
    for rank, offsets, sizes in sorted(all_boxes, key=lambda box: box[0] != me):
        if (offsets, sizes) not in listed:
            listed.add((offsets, sizes))
            metas.append(ShardMetadata(list(offsets), list(sizes), f"rank:{rank}/{device}"))
    mine = {
        (tuple(m.shard_offsets), tuple(m.shard_sizes)): m for m in metas if m.placement.rank() == me
    }
    shards = [Shard(tensor, mine[(offsets, sizes)]) for offsets, sizes, tensor in local]
    metadata = ShardedTensorMetadata(
        shards_metadata=metas,
        size=torch.Size(global_shape),
        tensor_properties=TensorProperties(dtype=dtype),
    )
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        shards, metadata, process_group=group
    )


def flat_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, segments: list[FlatSegment]
) -> dict[str, Any]:
    """The optimizer state flattened by parameter name (as DCP's ``get_state_dict`` with
    ``flatten_optimizer_state_dict`` names it), its tensors as ``ShardedTensor`` views.

    Collective over the default process group: every rank calls it with the same model."""
    import torch.distributed as dist

    # Which boxes every rank holds, for the ShardedTensor metadata: one all-gather.
    mine = [(s.fqn, offsets, sizes) for s in segments for offsets, sizes, _ in s.boxes()]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    boxes_of: dict[str, list] = {}
    for r, entries in enumerate(gathered):
        for fqn, offsets, sizes in entries:
            boxes_of.setdefault(fqn, []).append((r, tuple(offsets), tuple(sizes)))
    keys = _state_keys(optimizer, segments)
    gathered_keys: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered_keys, keys)
    keys = {k: v for entry in gathered_keys for k, v in entry.items()}
    params = dict(model.named_parameters())
    out: dict[str, Any] = {}
    for fqn in [f for f, _ in model.named_parameters() if f in boxes_of]:
        own = [s for s in segments if s.fqn == fqn]
        for key, (kind, dtype) in sorted(keys.items()):
            name = f"state.{fqn}.{key}"
            if kind == "scalar":
                if own:
                    out[name] = _state_value(optimizer, own[0], key, kind, dtype)
                continue
            local = []
            for s in own:
                flat = _state_value(optimizer, s, key, kind, dtype).reshape(-1)
                for offsets, sizes, at in s.boxes():
                    local.append((offsets, sizes, flat[at : at + math.prod(sizes)].view(sizes)))
            out[name] = _sharded(
                tuple(params[fqn].shape), local, boxes_of[fqn], getattr(torch, dtype), None
            )
    for group in optimizer.param_groups:
        fqns = {s.fqn for s in segments if any(s.opt_param is p for p in group["params"])}
        for fqn in sorted(fqns):
            for option, value in group.items():
                if option != "params":
                    out[f"param_groups.{fqn}.{option}"] = value
    return out


def _state_keys(
    optimizer: torch.optim.Optimizer, segments: list[FlatSegment]
) -> dict[str, tuple[str, str]]:
    """``{state key: ("scalar" | "elementwise", dtype name)}`` of this rank's slices."""
    keys: dict[str, tuple[str, str]] = {}
    for s in segments:
        for key, value in optimizer.state.get(s.opt_param, {}).items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(
                    f"{type(optimizer).__name__} keeps non-tensor state {key!r}; only tensor "
                    "state can be saved by parameter name for a flat (ZeRO) optimizer"
                )
            if value.dim() == 0:
                kind = "scalar"
            elif value.shape == s.opt_param.shape:
                kind = "elementwise"
            else:
                raise ValueError(
                    f"{type(optimizer).__name__} state {key!r} of shape {tuple(value.shape)} is "
                    f"neither a scalar nor shaped like its parameter {tuple(s.opt_param.shape)}"
                )
            keys[key] = (kind, str(value.dtype).removeprefix("torch."))
    return keys


def _state_value(
    optimizer: torch.optim.Optimizer, segment: FlatSegment, key: str, kind: str, dtype: str
) -> torch.Tensor:
    """The slice's ``key`` state, or zeros where the slice has none yet: a parameter that has
    had no gradient (``ZeroOptimizer`` does not step it, as a single process skips a gradient of
    ``None``) while others have. Zero moments and step 0 are the fresh state of the Adam family,
    so a resumed run steps it as the saved one would have."""
    value = optimizer.state.get(segment.opt_param, {}).get(key)
    if value is not None:
        return value
    like = () if kind == "scalar" else segment.opt_param.shape
    return torch.zeros(like, dtype=getattr(torch, dtype), device=segment.opt_param.device)


def init_flat_state(
    optimizer: torch.optim.Optimizer,
    segments: list[FlatSegment],
    stored: dict[str, tuple[tuple[int, ...], torch.dtype]],
) -> None:
    """Give every slice without state the state a checkpoint holds for its parameters (zeros,
    to be read in place): ``stored`` maps ``state.<fqn>.<key>`` to its size and dtype."""
    for s in segments:
        if optimizer.state.get(s.opt_param):
            continue
        prefix = f"state.{s.fqn}."
        state = {}
        for name, (size, dtype) in stored.items():
            if name.startswith(prefix) and "." not in name[len(prefix) :]:
                like = () if len(size) == 0 else s.opt_param.shape
                state[name[len(prefix) :]] = torch.zeros(
                    like, dtype=dtype, device=s.opt_param.device
                )
        if state:
            optimizer.state[s.opt_param] = state


def apply_param_groups(
    optimizer: torch.optim.Optimizer, segments: list[FlatSegment], flat_sd: dict[str, Any]
) -> None:
    """Set each parameter group's options (learning rate, betas, ...) from a loaded flat state
    dict (``param_groups.<fqn>.<option>`` of a parameter the group's slices cover)."""
    for group in optimizer.param_groups:
        fqns = sorted({s.fqn for s in segments if any(s.opt_param is p for p in group["params"])})
        if not fqns:
            continue
        prefix = f"param_groups.{fqns[0]}."
        for key, value in flat_sd.items():
            if key.startswith(prefix):
                option = key[len(prefix) :]
                group[option] = tuple(value) if isinstance(group.get(option), tuple) else value


def stage(stager, flat: dict[str, Any]) -> dict[str, Any]:
    """``stager.stage(flat)`` (DCP's CPU copy for an asynchronous save), for dicts that hold
    ``ShardedTensor`` s too (which the stager cannot copy): their local boxes are staged with
    the rest (views of one storage stay views of one staged copy) and rebuilt around them."""
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor

    sharded = {k: v for k, v in flat.items() if isinstance(v, ShardedTensor)}
    if not sharded:
        return stager.stage(flat)
    plain = {k: v for k, v in flat.items() if k not in sharded}
    local = {k: [s.tensor for s in v.local_shards()] for k, v in sharded.items()}
    staged = stager.stage({"plain": plain, "local": local})
    out = staged["plain"]
    for key, value in sharded.items():
        shards = [
            Shard(tensor, shard.metadata)
            for tensor, shard in zip(staged["local"][key], value.local_shards(), strict=True)
        ]
        out[key] = ShardedTensor._init_from_local_shards_and_global_metadata(
            shards, value.metadata(), process_group=value._process_group
        )
    return out
