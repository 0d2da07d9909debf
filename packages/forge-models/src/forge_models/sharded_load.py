"""Load a Hugging Face checkpoint into a parallelized model: each rank reads only what it holds.

:func:`load_hf_shards` takes a model whose parameters may be DTensors (FSDP2, tensor parallel,
packed column parallel, expert parallel: see :mod:`forge_models.local_shards`), or a pipeline
stage (a module holding some of the model's parameters under their full-model names, as
``forge_parallel.pipeline.StageModule`` does). For every tensor this rank holds it finds the
mapping rule that produces it and the global positions of its local shard, follows them back
through the rule to boxes of checkpoint tensors, and reads only those boxes
(:class:`~forge_ckpt.hf.SliceReader`, ``safetensors``' ``get_slice``):

- renamed tensors, and tensors built by layout transforms that move whole rows and columns
  (:class:`~forge_ckpt.mapping.spec.Concat` of fused gate/up, :class:`StackExperts` of
  per-expert weights, :class:`PadDim` vocabulary padding, :class:`Transpose`), are read box by
  box: an FSDP rank reads its rows, a TP rank its columns, an EP rank its experts' tensors;
- any other rule (Megatron's grouped QKV, a checkpoint's duplicate tensors that must be
  checked against their source, a composed VLM part) is materialized whole, one mapped tensor
  at a time, and its local box copied (peak memory: about one tensor).

When the local shard of a plain renamed tensor (or each part of a dim-0 ``Concat``, the fused
``gate_up``; vocabulary padding allowed when the shard holds no padding row) is one contiguous byte range of the file (FSDP's and column parallelism's row
blocks, a whole replicated tensor), it is read straight into the parameter's memory with one
``preadv`` (:meth:`~forge_ckpt.hf.SliceReader.read_into`): no memory map, no intermediate box.

The checks are those of a whole load: the checkpoint is validated from its headers before any
data is read (missing / unexpected / mis-shaped tensors, against the *global* shapes of the
rank's tensors); a tensor this rank holds that the checkpoint cannot fill is an error, a mapped
tensor this rank does not hold (another pipeline stage's) is skipped.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from forge_ckpt import HFCheckpoint, get_mapping
from forge_ckpt.hf import SliceReader
from forge_ckpt.mapping.spec import (
    BoundRule,
    Concat,
    PadDim,
    StackExperts,
    Transpose,
)
from forge_models.config import TransformerConfig
from forge_models.hf import loading_context
from forge_models.local_shards import local_index
from forge_models.registry import get_family
from forge_models.vlm.config import VLMConfig

__all__ = ["ShardLoadReport", "load_hf_shards"]

Index = list[torch.Tensor]  # per-dim global positions, in local order


@dataclass(frozen=True)
class ShardLoadReport:
    """What one rank's :func:`load_hf_shards` did.

    ``bytes_read``: bytes the checkpoint reader returned on this rank (checkpoint dtype);
    ``bytes_local``: bytes of the local shards filled, in the checkpoint's dtype (equal to
    ``bytes_read`` when every tensor was read box by box, except for vocabulary padding rows,
    which are zeros and not read); ``sliced`` / ``materialized``:
    tensors read box by box / built whole first; ``skipped``: mapped tensors this rank does not
    hold; ``direct``: of the ``sliced`` tensors, those read straight from the file into the
    parameter (one ``preadv`` per contiguous part).
    """

    tensors: int
    sliced: int
    materialized: int
    skipped: int
    bytes_read: int
    bytes_local: int
    direct: int = 0


def _tied_aliases(state: Mapping[str, torch.Tensor], produced: set[str], tied: bool) -> dict:
    """Names of tied output projections a rank holds apart from their embedding (a pipeline's
    last stage holds ``lm_head.weight`` without ``embed_tokens``): loaded from the embedding."""
    if not tied:
        return {}
    out = {}
    for name in state:
        if name.endswith("lm_head.weight") and name not in produced:
            source = name.removesuffix("lm_head.weight") + "embed_tokens.weight"
            if source in produced:
                out[name] = source
    return out


# --------------------------------------------------------------------------------------------
# Reading boxes
# --------------------------------------------------------------------------------------------


def _runs(positions: torch.Tensor) -> list[tuple[int, int]]:
    """``positions`` as ``[start, stop)`` runs of consecutive values, in order."""
    if positions.numel() == 0:
        return [(0, 0)]
    breaks = ((positions[1:] - positions[:-1]) != 1).nonzero().flatten() + 1
    starts = [0, *breaks.tolist()]
    stops = [*breaks.tolist(), positions.numel()]
    return [
        (int(positions[a]), int(positions[b - 1]) + 1) for a, b in zip(starts, stops, strict=True)
    ]


def _read_box(reader: SliceReader, name: str, index: Index) -> torch.Tensor:
    """``t[ix_(*index)]`` of checkpoint tensor ``name``: one contiguous read per run combination."""
    runs = [_runs(i) for i in index]

    def gather(prefix: tuple[slice, ...]) -> torch.Tensor:
        dim = len(prefix)
        if dim == len(runs):
            return reader.read(name, prefix)
        parts = [gather((*prefix, slice(a, b))) for a, b in runs[dim]]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)

    return gather(())


def _segments(positions: torch.Tensor, extents: Sequence[int]) -> list[tuple[int, torch.Tensor]]:
    """Split joined positions into ``(part, local positions)`` runs of one part each."""
    bounds = torch.tensor(list(extents)).cumsum(0)
    part = torch.bucketize(positions, bounds, right=True)
    offsets = torch.cat([torch.zeros(1, dtype=bounds.dtype), bounds])[part]
    local = positions - offsets
    if positions.numel() == 0:
        return [(0, local)]
    change = ((part[1:] != part[:-1]).nonzero().flatten() + 1).tolist()
    starts, stops = [0, *change], [*change, positions.numel()]
    return [(int(part[a]), local[a:b]) for a, b in zip(starts, stops, strict=True)]


def _read_joined(
    b: BoundRule, index: Index, reader: SliceReader, shapes: Mapping[str, tuple[int, ...]]
) -> torch.Tensor | None:
    """The box ``index`` of the rule's joined tensor (before its transforms), or ``None``."""
    join = b.rule.concat
    if join is None:
        return _read_box(reader, b.hf[0], index)
    if type(join) is Concat:
        dim = join.dim % len(index)
        extents = [shapes[n][dim] for n in b.hf]
        pieces = []
        for part, local in _segments(index[dim], extents):
            sub = list(index)
            sub[dim] = local
            pieces.append(_read_box(reader, b.hf[part], sub))
        return torch.cat(pieces, dim=dim)
    if type(join) is StackExperts:
        experts = len(b.hf) // join.groups
        dim = join.dim % len(index)  # in the stacked tensor; dim - 1 in each part
        extent = shapes[b.hf[0]][dim - 1]
        rows = []
        for j in index[0].tolist():
            pieces = []
            for group, local in _segments(index[dim], [extent] * join.groups):
                sub = list(index[1:])
                sub[dim - 1] = local
                pieces.append(_read_box(reader, b.hf[group * experts + j], sub))
            rows.append(torch.cat(pieces, dim=dim - 1))
        if not rows:  # no local experts
            empty = _read_box(reader, b.hf[0], [i[:0] for i in index[1:]])
            return empty.new_empty([len(i) for i in index])
        return torch.stack(rows)
    return None


def _read_sliced(
    b: BoundRule,
    index: Index,
    reader: SliceReader,
    ctx: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
) -> torch.Tensor | None:
    """The local box of forge tensor ``b.forge``, reading only it; ``None`` if the rule's layout
    transforms are not ones this follows (the caller then materializes the tensor)."""
    if type(b) is not BoundRule or b.copy_of:
        return None
    index = list(index)
    ndim = len(index)
    undo = []  # the transforms, mapped back to the joined tensor's positions
    for t in reversed(b.rule.transforms):
        if type(t) is Transpose:
            d0, d1 = t.dim0 % ndim, t.dim1 % ndim
            index[d0], index[d1] = index[d1], index[d0]
            undo.append((t, d0, d1))
        elif type(t) is PadDim:
            size, _ = t.padded(ctx)
            dim = t.dim % ndim
            keep = index[dim] < size  # the padding rows are zeros, not in the checkpoint
            index[dim] = index[dim][keep]
            undo.append((t, dim, keep))
        else:
            return None
    box = _read_joined(b, index, reader, shapes)
    if box is None:
        return None
    for t, a, c in reversed(undo):  # apply the transforms in import order
        if type(t) is Transpose:
            box = box.transpose(a, c)
        else:
            shape = list(box.shape)
            shape[a] = len(c)
            padded = box.new_zeros(shape)
            box = padded.index_copy_(a, c.nonzero().flatten(), box)
    return box


def _one_run(positions: torch.Tensor) -> slice | None:
    """``positions`` as one ``slice`` when they are consecutive (``None`` otherwise)."""
    runs = _runs(positions)
    return slice(*runs[0]) if len(runs) == 1 else None


def _read_direct(
    b: BoundRule,
    index: Index,
    local: torch.Tensor,
    reader: SliceReader,
    ctx: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
) -> bool | None:
    """Read the local box of a plain renamed tensor, or of a dim-0 ``Concat`` of them, into
    ``local`` with one :meth:`SliceReader.read_into` per part; returns whether every part went
    straight from the file, or ``None`` (nothing read) when the rule or box is not of that kind
    (one run of positions per dim and per part)."""
    if type(b) is not BoundRule or b.copy_of or not local.is_contiguous():
        return None
    if not index or local.numel() == 0:
        return None
    for t in b.rule.transforms:  # vocabulary padding: fine when the box holds no padding row
        if type(t) is not PadDim or int(index[t.dim % len(index)].max()) >= t.padded(ctx)[0]:
            return None
    rest = [_one_run(i) for i in index[1:]]
    if any(r is None for r in rest):
        return None
    join = b.rule.concat
    if join is None:
        parts = [(0, _one_run(index[0]))]
    elif type(join) is Concat and join.dim % len(index) == 0:
        parts = [
            (part, _one_run(positions))
            for part, positions in _segments(index[0], [shapes[n][0] for n in b.hf])
        ]
    else:
        return None
    if any(rows is None for _, rows in parts):
        return None
    straight, start = True, 0
    for part, rows in parts:
        count = rows.stop - rows.start
        view = local.narrow(0, start, count)
        straight &= reader.read_into(b.hf[part], (rows, *rest), view)
        start += count
    return straight


def _read_materialized(
    b: BoundRule, index: Index, reader: SliceReader, ctx: Mapping[str, Any]
) -> torch.Tensor:
    full = b.to_forge([reader.read(name) for name in b.hf], ctx)
    for dim, positions in enumerate(index):
        if positions.numel() != full.shape[dim] or not torch.equal(
            positions, torch.arange(full.shape[dim])
        ):
            full = full.index_select(dim, positions)
    return full


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _local(tensor: torch.Tensor) -> torch.Tensor:
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def load_hf_shards(
    model: nn.Module,
    hf_dir: str | os.PathLike | HFCheckpoint,
    *,
    config: TransformerConfig | VLMConfig | None = None,
    direct: bool = True,
) -> ShardLoadReport:
    """Fill this rank's part of ``model`` from a Hugging Face checkpoint, reading only that part.

    Args:
        model: a materialized forge model, plain or parallelized (DTensor parameters), or a
            pipeline stage module holding some of its tensors under their full-model names.
        hf_dir: the checkpoint folder (or an open :class:`~forge_ckpt.HFCheckpoint`).
        config: the model's config (:class:`TransformerConfig`, or a VLM's); default
            ``model.config`` (a pipeline stage module has none: pass the whole model's).
        direct: read contiguous local shards straight into the parameters (``preadv``);
            ``False`` reads every box through the memory-mapped slice reader (as before; kept
            for comparison in the benchmark).

    Tensors are cast to each parameter's dtype and device as they are copied. Raises
    :class:`forge_ckpt.CheckpointMismatchError` before reading any data if the checkpoint does
    not fit the tensors this rank holds. No collective: ranks load independently.
    """
    config = config if config is not None else getattr(model, "config", None)
    if not isinstance(config, TransformerConfig | VLMConfig):
        raise ValueError(
            f"{type(model).__name__} has no forge model config as .config (a pipeline stage "
            "module?); pass config=<the whole model's config>"
        )
    ckpt = hf_dir if isinstance(hf_dir, HFCheckpoint) else HFCheckpoint(hf_dir)
    spec = get_mapping(get_family(config.family).ckpt_mapping)
    ctx = loading_context(spec, ckpt, config)
    infos = ckpt.tensor_info()
    shapes = {name: tuple(info.shape) for name, info in infos.items()}
    bound = {b.forge: b for b in spec.bind(ctx)}
    state = model.state_dict()
    text = config.text if isinstance(config, VLMConfig) else config
    aliases = _tied_aliases(state, set(bound), text.tie_word_embeddings)
    spec.check_hf(
        shapes,
        ctx,
        {n: tuple(t.shape) for n, t in state.items() if n not in aliases},
        hf_dtypes={name: info.dtype for name, info in infos.items()},
    )
    sliced = materialized = bytes_local = direct_reads = 0
    with torch.no_grad(), ckpt.slice_reader() as reader:
        for name, target in state.items():
            b = bound[aliases.get(name, name)]
            index = local_index(target)
            local = _local(target)
            before = reader.bytes_read
            straight = _read_direct(b, index, local, reader, ctx, shapes) if direct else None
            if straight is not None:
                sliced += 1
                direct_reads += straight
                bytes_local += reader.bytes_read - before  # exactly the box, checkpoint dtype
                continue
            box = _read_sliced(b, index, reader, ctx, shapes)
            if box is None:
                box = _read_materialized(b, index, reader, ctx)
                materialized += 1
            else:
                sliced += 1
            assert box.shape == local.shape, (name, tuple(box.shape), tuple(local.shape))
            local.copy_(box)
            bytes_local += box.numel() * box.element_size()
        bytes_read = reader.bytes_read
    held = {aliases.get(n, n) for n in state}
    return ShardLoadReport(
        tensors=len(state),
        sliced=sliced,
        materialized=materialized,
        skipped=len(set(bound) - held),
        bytes_read=bytes_read,
        bytes_local=bytes_local,
        direct=direct_reads,
    )
