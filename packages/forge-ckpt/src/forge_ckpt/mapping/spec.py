"""Checkpoint mappings as data: name patterns and invertible layout transforms.

A :class:`MappingSpec` says how the tensors of one model family are named and laid out in a
Hugging Face checkpoint and in forge. It is a list of :class:`Rule` s, each pairing one forge
tensor with one or more checkpoint tensors::

    Rule("layers.{i}.mlp.gate_up_proj.weight",
         ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
         concat=Concat(dim=0))
    Rule("embed_tokens.weight", "model.embed_tokens.weight", transforms=(PAD_VOCAB,))
    Rule("lm_head.weight", "lm_head.weight", transforms=(PAD_VOCAB,), when="!tie_word_embeddings")

``{i}`` runs over the layers; a forge name with ``{k}`` instead binds the checkpoint layers
*after* the model's ``num_layers`` (``num_hf_layers`` of the context, default ``num_layers``), with
``k = i - num_layers`` (DeepSeek-V3 stores its multi-token prediction modules as extra layers:
``mtp.{k}.enorm.weight <- model.layers.{i}.enorm.weight``); the extra layers listed in
``ignored_hf_layers`` are bound too and their tensors dropped. ``{j}`` in a checkpoint name runs
over the experts
(``num_experts`` of the context), giving one part per expert and name, which a
:class:`StackExperts` stacks into one ``[experts, ...]`` tensor (the per-expert layout of
mixture-of-experts checkpoints); with ``{j}`` in the forge name too, the rule gives one forge
tensor per expert instead (Megatron-Core's ``local_experts.{j}``). :class:`GroupedQKV` joins
q, k and v into Megatron-Core's per-group ``[q-group, k, v]`` layout. Several checkpoint tensors are joined by a :class:`Concat` (and
split again on export); single-tensor transforms (:class:`Transpose`, :class:`PadDim`) then
apply in order on import and are undone in reverse order on export. ``when`` names a boolean
of the *context* (``"!flag"`` negates it; a tuple needs all its flags): the rule exists only if
it holds. A flag whose context value is a set of layer indices holds on those layers only
(e.g. the mixture-of-experts layers). The context is
read from the checkpoint's ``config.json`` through ``context_keys`` (also data) plus caller
options such as ``vocab_pad_multiple``.

A checkpoint may hold exact copies of a tensor (:class:`HFCopy`: DeepSeek-V3's multi-token
prediction layers repeat the embedding and the output head): export writes them, import checks
each equals its source bit for bit and drops it. A copy is one more checkpoint name of its
source's bound rule, so every listing of checkpoint names (checks, dry runs) includes it.

The same spec drives both directions (:meth:`MappingSpec.hf_to_forge`,
:meth:`MappingSpec.forge_to_hf`), both stream (one tensor in, tensors out as soon as all their
parts arrived), and every transform is exactly invertible, so HF -> forge -> HF is bit-exact.
:meth:`MappingSpec.check_hf` validates a checkpoint from its header shapes before any data is
read and raises :class:`~forge_ckpt.errors.CheckpointMismatchError` listing missing,
unexpected and mis-shaped tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from forge_ckpt.bits import identical
from forge_ckpt.errors import CheckpointMismatchError

__all__ = [
    "PAD_VOCAB",
    "REQUIRED",
    "BoundRule",
    "Concat",
    "GroupedQKV",
    "HFCopy",
    "MappingSpec",
    "PadDim",
    "Rule",
    "StackExperts",
    "TensorTransform",
    "Transpose",
]

Shape = tuple[int, ...]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


#: Marks a context key without default: the checkpoint config must provide it.
REQUIRED: Any = _Required()


def _is_floating(dtype: Any) -> bool:
    """Whether a dtype (a torch dtype, its name, or a safetensors code such as ``"I32"``) is a
    floating-point one; unknown names count as floating (nothing is refused on a guess)."""
    if isinstance(dtype, torch.dtype):
        return dtype.is_floating_point
    text = str(dtype)
    if text.startswith("torch."):
        found = getattr(torch, text.removeprefix("torch."), None)
        return not isinstance(found, torch.dtype) or found.is_floating_point
    return not (text == "BOOL" or (text[:1] in ("I", "U") and text[1:].isdigit()))


def _fill_views(views: Sequence[torch.Tensor], parts: Sequence[torch.Tensor]) -> None:
    for view, part in zip(views, parts, strict=True):
        view.copy_(part.reshape(view.shape))


def _check_out(out: torch.Tensor, shape: Shape) -> None:
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"the joined tensor has shape {list(shape)}, the target {list(out.shape)}")


def _resolve(value: int | str, ctx: Mapping[str, Any]) -> int:
    """An int, or the int a context key names."""
    if isinstance(value, str):
        if value not in ctx:
            raise KeyError(f"the mapping needs context key {value!r}, which is not set")
        return int(ctx[value])
    return int(value)


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Concat:
    """Several checkpoint tensors form one forge tensor, concatenated along ``dim`` in order.

    ``sizes`` gives each part's extent along ``dim`` (ints or context keys) for splitting on
    export; ``None`` means equal parts (a fused gate/up projection).
    """

    dim: int = 0
    sizes: tuple[int | str, ...] | None = None

    def part_sizes(self, total: int, n_parts: int, ctx: Mapping[str, Any]) -> list[int]:
        if self.sizes is None:
            if total % n_parts:
                raise ValueError(f"cannot split extent {total} into {n_parts} equal parts")
            return [total // n_parts] * n_parts
        if len(self.sizes) != n_parts:
            raise ValueError(f"Concat has {len(self.sizes)} sizes for {n_parts} parts")
        sizes = [_resolve(s, ctx) for s in self.sizes]
        if sum(sizes) != total:
            raise ValueError(f"parts of sizes {sizes} do not add up to extent {total}")
        return sizes

    def join(self, parts: Sequence[torch.Tensor], ctx: Mapping[str, Any]) -> torch.Tensor:
        self.joined_shape([tuple(p.shape) for p in parts], ctx)
        return torch.cat(list(parts), dim=self.dim)

    def part_views(
        self, out: torch.Tensor, shapes: Sequence[Shape], ctx: Mapping[str, Any]
    ) -> list[torch.Tensor]:
        """The view of the joined ``out`` that each part (of ``shapes``) fills."""
        _check_out(out, self.joined_shape(shapes, ctx))
        views, offset = [], 0
        for shape in shapes:
            extent = shape[self.dim]
            views.append(out.narrow(self.dim, offset, extent))
            offset += extent
        return views

    def join_into(
        self, out: torch.Tensor, parts: Sequence[torch.Tensor], ctx: Mapping[str, Any]
    ) -> None:
        """:meth:`join` written straight into ``out`` (each part copied once, cast to its dtype)."""
        _fill_views(self.part_views(out, [tuple(p.shape) for p in parts], ctx), parts)

    def split(
        self, tensor: torch.Tensor, n_parts: int, ctx: Mapping[str, Any]
    ) -> list[torch.Tensor]:
        sizes = self.part_sizes(tensor.shape[self.dim], n_parts, ctx)
        return list(torch.split(tensor, sizes, dim=self.dim))

    def joined_shape(self, shapes: Sequence[Shape], ctx: Mapping[str, Any]) -> Shape:
        first = shapes[0]
        dim = self.dim % len(first) if first else 0
        for s in shapes:
            if len(s) != len(first) or any(
                a != b for d, (a, b) in enumerate(zip(s, first, strict=True)) if d != dim
            ):
                raise ValueError(
                    f"parts of shapes {[list(x) for x in shapes]} cannot be concatenated on dim {self.dim}"
                )
        extents = [s[dim] for s in shapes]
        if self.sizes is None and len(set(extents)) != 1:
            raise ValueError(f"parts must be equal along dim {self.dim}, got {extents}")
        if self.sizes is not None:
            want = [_resolve(x, ctx) for x in self.sizes]
            if extents != want:
                raise ValueError(
                    f"parts have extents {extents} along dim {self.dim}, expected {want}"
                )
        return (*first[:dim], sum(extents), *first[dim + 1 :])

    def describe(self) -> str:
        return f"concat(dim={self.dim})"


@dataclass(frozen=True)
class StackExperts:
    """Per-expert checkpoint tensors form one stacked forge tensor ``[experts, ...]``.

    The parts come as ``groups`` runs of one tensor per expert (a rule's names with ``{j}``,
    expanded name by name: all gates, then all ups). Each run is stacked on a new dim 0 and the
    runs are concatenated along ``dim`` (of the stacked tensor): per-expert ``gate_proj``
    ``[I, H]`` and ``up_proj`` ``[I, H]`` give ``gate_up_proj`` ``[E, 2I, H]`` with
    ``groups=2, dim=1``; ``down_proj`` ``[H, I]`` gives ``[E, H, I]`` with ``groups=1``.
    """

    groups: int = 1
    dim: int = 1

    def _experts(self, n_parts: int) -> int:
        if n_parts % self.groups:
            raise ValueError(f"{n_parts} parts do not form {self.groups} equal groups")
        return n_parts // self.groups

    def join(self, parts: Sequence[torch.Tensor], ctx: Mapping[str, Any]) -> torch.Tensor:
        self.joined_shape([tuple(p.shape) for p in parts], ctx)
        e = self._experts(len(parts))
        runs = [torch.stack(list(parts[g * e : (g + 1) * e])) for g in range(self.groups)]
        return runs[0] if self.groups == 1 else torch.cat(runs, dim=self.dim)

    def part_views(
        self, out: torch.Tensor, shapes: Sequence[Shape], ctx: Mapping[str, Any]
    ) -> list[torch.Tensor]:
        """The view of the stacked ``out`` that each part (of ``shapes``) fills."""
        _check_out(out, self.joined_shape(shapes, ctx))
        e = self._experts(len(shapes))
        extent = out.shape[self.dim] // self.groups
        runs = [out.narrow(self.dim, g * extent, extent) for g in range(self.groups)]
        return [run[j] for run in runs for j in range(e)]

    def join_into(
        self, out: torch.Tensor, parts: Sequence[torch.Tensor], ctx: Mapping[str, Any]
    ) -> None:
        """:meth:`join` written straight into ``out`` (each part copied once, cast to its dtype)."""
        _fill_views(self.part_views(out, [tuple(p.shape) for p in parts], ctx), parts)

    def split(
        self, tensor: torch.Tensor, n_parts: int, ctx: Mapping[str, Any]
    ) -> list[torch.Tensor]:
        e = self._experts(n_parts)
        if tensor.shape[0] != e:
            raise ValueError(f"expected {e} experts along dim 0, got {tuple(tensor.shape)}")
        runs = tensor.chunk(self.groups, dim=self.dim) if self.groups > 1 else (tensor,)
        return [t.contiguous() for run in runs for t in run.unbind(0)]

    def joined_shape(self, shapes: Sequence[Shape], ctx: Mapping[str, Any]) -> Shape:
        first = tuple(shapes[0])
        if any(tuple(s) != first for s in shapes):
            raise ValueError(
                f"expert parts have different shapes {sorted({tuple(s) for s in shapes})}"
            )
        e = self._experts(len(shapes))
        stacked = [e, *first]
        stacked[self.dim] *= self.groups
        return tuple(stacked)

    def describe(self) -> str:
        return f"stack_experts(groups={self.groups}, dim={self.dim})"


@dataclass(frozen=True)
class GroupedQKV:
    """Query, key and value projections form one fused ``[q-group, k, v]`` per key/value group.

    The layout of Megatron-Core's ``linear_qkv`` (weight ``[groups * (q_per_group + 2) * d, H]``,
    bias likewise without ``H``): for each of the ``groups`` key/value heads (grouped-query
    attention, Ainslie et al. 2023, arXiv:2305.13245) the rows of its ``heads // groups`` query
    heads, then its key head, then its value head. Splitting the fused tensor into
    tensor-parallel shards along dim 0 then gives every rank whole groups. The parts are the
    checkpoint's separate ``q_proj`` ``[heads * d, ...]``, ``k_proj`` and ``v_proj``
    ``[groups * d, ...]`` (in that order); ``heads``, ``groups`` and ``head_dim`` are ints or
    context keys.
    """

    heads: int | str = "num_attention_heads"
    groups: int | str = "num_key_value_heads"
    head_dim: int | str = "head_dim"

    def _dims(self, ctx: Mapping[str, Any]) -> tuple[int, int, int]:
        heads, groups, d = (_resolve(x, ctx) for x in (self.heads, self.groups, self.head_dim))
        if groups < 1 or heads % groups:
            raise ValueError(
                f"{heads} query heads do not form {groups} equal key/value groups: "
                "num_attention_heads must be a multiple of num_key_value_heads"
            )
        return heads, groups, d

    def joined_shape(self, shapes: Sequence[Shape], ctx: Mapping[str, Any]) -> Shape:
        heads, groups, d = self._dims(ctx)
        if len(shapes) != 3:
            raise ValueError(f"GroupedQKV joins q, k and v: 3 parts, got {len(shapes)}")
        want = [heads * d, groups * d, groups * d]
        got = [s[0] if s else 0 for s in shapes]
        rest = {tuple(s[1:]) for s in shapes}
        if got != want or len(rest) != 1:
            raise ValueError(
                f"q, k, v of shapes {[list(s) for s in shapes]} do not fit {heads} query heads "
                f"in {groups} groups of head dim {d} (expected dim-0 extents {want})"
            )
        return ((heads + 2 * groups) * d, *shapes[0][1:])

    def join(self, parts: Sequence[torch.Tensor], ctx: Mapping[str, Any]) -> torch.Tensor:
        self.joined_shape([tuple(p.shape) for p in parts], ctx)
        heads, groups, d = self._dims(ctx)
        q, k, v = parts
        rest = tuple(q.shape[1:])
        q_g = q.reshape(groups, heads // groups * d, *rest)
        fused = torch.cat([q_g, k.reshape(groups, d, *rest), v.reshape(groups, d, *rest)], dim=1)
        return fused.reshape(-1, *rest)

    def part_views(
        self, out: torch.Tensor, shapes: Sequence[Shape], ctx: Mapping[str, Any]
    ) -> list[torch.Tensor]:
        """The view of the fused ``out`` that q, k and v fill (``[groups, rows, ...]``: a part
        fills it reshaped, row-major)."""
        _check_out(out, self.joined_shape(shapes, ctx))
        heads, groups, d = self._dims(ctx)
        per_group = out.unflatten(0, (groups, -1))  # a view: dim 0 is the outermost dim
        views, offset = [], 0
        for rows in (heads // groups * d, d, d):
            views.append(per_group.narrow(1, offset, rows))
            offset += rows
        return views

    def join_into(
        self, out: torch.Tensor, parts: Sequence[torch.Tensor], ctx: Mapping[str, Any]
    ) -> None:
        """:meth:`join` written straight into ``out`` (each part copied once, cast to its dtype)."""
        _fill_views(self.part_views(out, [tuple(p.shape) for p in parts], ctx), parts)

    def split(
        self, tensor: torch.Tensor, n_parts: int, ctx: Mapping[str, Any]
    ) -> list[torch.Tensor]:
        heads, groups, d = self._dims(ctx)
        if n_parts != 3 or tensor.shape[0] != (heads + 2 * groups) * d:
            raise ValueError(
                f"cannot split {tuple(tensor.shape)} into q, k, v of {heads} query heads in "
                f"{groups} groups of head dim {d}"
            )
        rest = tuple(tensor.shape[1:])
        per_group = tensor.reshape(groups, (heads // groups + 2) * d, *rest)
        q, k, v = torch.split(per_group, [heads // groups * d, d, d], dim=1)
        return [x.reshape(-1, *rest).contiguous() for x in (q, k, v)]

    def describe(self) -> str:
        return f"grouped_qkv(heads={self.heads}, groups={self.groups}, head_dim={self.head_dim})"


class TensorTransform:
    """An invertible layout change of one tensor: ``to_hf(to_forge(t)) == t`` bit for bit."""

    def to_forge(self, t: torch.Tensor, ctx: Mapping[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def to_hf(self, t: torch.Tensor, ctx: Mapping[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def forge_shape(self, shape: Shape, ctx: Mapping[str, Any]) -> Shape:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__.lower()


@dataclass(frozen=True)
class Transpose(TensorTransform):
    """Swap two dims (e.g. a ``[in, out]`` checkpoint weight for ``nn.Linear``'s ``[out, in]``)."""

    dim0: int = 0
    dim1: int = 1

    def to_forge(self, t, ctx):
        return t.transpose(self.dim0, self.dim1)

    def to_hf(self, t, ctx):
        return t.transpose(self.dim0, self.dim1)

    def forge_shape(self, shape, ctx):
        s = list(shape)
        s[self.dim0], s[self.dim1] = s[self.dim1], s[self.dim0]
        return tuple(s)

    def describe(self) -> str:
        return f"transpose({self.dim0}, {self.dim1})"


@dataclass(frozen=True)
class PadDim(TensorTransform):
    """Zero-pad ``dim`` from ``size`` up to a multiple of ``multiple`` on import; cut on export.

    ``size`` and ``multiple`` are ints or context keys. With the defaults this is vocabulary
    padding (Megatron-LM pads the embedding and output rows to a multiple of the tensor-parallel
    degree times 128 so every rank holds an equal, aligned slice); the checkpoint keeps the real
    vocabulary size, so export drops the padding rows again.
    """

    size: int | str = "vocab_size"
    multiple: int | str = "vocab_pad_multiple"
    dim: int = 0

    def padded(self, ctx: Mapping[str, Any]) -> tuple[int, int]:
        size, multiple = _resolve(self.size, ctx), _resolve(self.multiple, ctx)
        if multiple < 1:
            raise ValueError(f"the padding multiple must be >= 1, got {multiple}")
        return size, math.ceil(size / multiple) * multiple

    def to_forge(self, t, ctx):
        size, padded = self.padded(ctx)
        if t.shape[self.dim] != size:
            raise ValueError(f"expected extent {size} along dim {self.dim}, got {tuple(t.shape)}")
        if padded == size:
            return t
        pad_shape = list(t.shape)
        pad_shape[self.dim] = padded - size
        return torch.cat([t, t.new_zeros(pad_shape)], dim=self.dim)

    def to_hf(self, t, ctx):
        size, padded = self.padded(ctx)
        if t.shape[self.dim] != padded:
            raise ValueError(
                f"expected extent {padded} (padded) along dim {self.dim}, got {tuple(t.shape)}"
            )
        return t.narrow(self.dim, 0, size)

    def forge_shape(self, shape, ctx):
        size, padded = self.padded(ctx)
        if shape[self.dim] != size:
            raise ValueError(f"extent {shape[self.dim]} along dim {self.dim}, config says {size}")
        s = list(shape)
        s[self.dim] = padded
        return tuple(s)

    def describe(self) -> str:
        return f"pad(dim={self.dim}, {self.size} -> multiple of {self.multiple})"


#: Vocabulary padding of embedding / output rows (see :class:`PadDim`).
PAD_VOCAB = PadDim()


# --------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------


def _flag(
    when: str | tuple[str, ...] | None, ctx: Mapping[str, Any], layer: int | None = None
) -> bool:
    """Whether ``when`` holds (for ``layer``, where a flag is a set of layer indices)."""
    if when is None:
        return True
    if isinstance(when, tuple):
        return all(_flag(w, ctx, layer) for w in when)
    negate = when.startswith("!")
    key = when[1:] if negate else when
    if key not in ctx:
        raise KeyError(f"the mapping needs context flag {key!r}, which is not set")
    value = ctx[key]
    if isinstance(value, (set, frozenset)):
        if layer is None:
            raise ValueError(f"context flag {key!r} is per layer; use it on per-layer rules only")
        return (layer in value) != negate
    return bool(value) != negate


@dataclass(frozen=True)
class Rule:
    """One forge tensor and the checkpoint tensor(s) it comes from (see the module docstring)."""

    forge: str
    hf: str | tuple[str, ...]
    concat: Concat | StackExperts | GroupedQKV | None = None
    transforms: tuple[TensorTransform, ...] = ()
    when: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        hf = (self.hf,) if isinstance(self.hf, str) else tuple(self.hf)
        object.__setattr__(self, "hf", hf)
        if not hf:
            raise ValueError(f"rule for {self.forge!r} names no checkpoint tensor")
        if len(hf) > 1 and self.concat is None:
            raise ValueError(
                f"rule for {self.forge!r} joins {len(hf)} tensors: give concat=Concat(...)"
            )
        if any("{k}" in name for name in hf):
            raise ValueError(
                f"rule {self.forge!r} <- {hf}: '{{k}}' (an extra layer) belongs in the forge "
                "name only; the checkpoint names use '{i}'"
            )
        if "{i}" in self.forge and "{k}" in self.forge:
            raise ValueError(f"rule {self.forge!r}: use '{{i}}' or '{{k}}' in it, not both")
        layered = self.per_layer
        if any(("{i}" in name) != layered for name in hf):
            raise ValueError(
                f"rule {self.forge!r} <- {hf}: use '{{i}}' (or '{{k}}' in the forge name) on "
                "both sides or neither"
            )
        if "{j}" in self.forge:
            # One target tensor per expert (e.g. Megatron's local_experts.{j}): {j} on both sides.
            if not all("{j}" in name for name in hf) or isinstance(self.concat, StackExperts):
                raise ValueError(
                    f"rule {self.forge!r} <- {hf}: a per-expert target needs '{{j}}' in every "
                    "checkpoint name and no StackExperts"
                )
        elif any("{j}" in name for name in hf) and not isinstance(self.concat, StackExperts):
            raise ValueError(f"rule {self.forge!r}: per-expert names '{{j}}' need StackExperts")

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.forge or "{k}" in self.forge

    @property
    def extra_layer(self) -> bool:
        """Binds the checkpoint layers after the model's (``{k}`` in the forge name)."""
        return "{k}" in self.forge

    def _fmt(self, ctx: Mapping[str, Any], layer: int | None) -> dict[str, int]:
        if layer is None:
            return {}
        if self.extra_layer:
            return {"i": layer, "k": layer - _resolve("num_layers", ctx)}
        return {"i": layer}

    def bind(self, ctx: Mapping[str, Any], layer: int | None = None) -> BoundRule:
        fmt = self._fmt(ctx, layer)
        hf: list[str] = []
        for name in self.hf:
            if "{j}" in name:
                hf += [name.format(**fmt, j=j) for j in range(_resolve("num_experts", ctx))]
            else:
                hf.append(name.format(**fmt))
        return BoundRule(forge=self.forge.format(**fmt), hf=tuple(hf), rule=self)

    def bind_each(self, ctx: Mapping[str, Any], layer: int | None = None) -> list[BoundRule]:
        """:meth:`bind`, once per expert when the target name holds ``{j}`` (else one rule)."""
        if "{j}" not in self.forge:
            return [self.bind(ctx, layer)]
        fmt = self._fmt(ctx, layer)
        return [
            BoundRule(
                forge=self.forge.format(**fmt, j=j),
                hf=tuple(name.format(**fmt, j=j) for name in self.hf),
                rule=self,
            )
            for j in range(_resolve("num_experts", ctx))
        ]


@dataclass(frozen=True)
class HFCopy:
    """Checkpoint tensor ``name`` is an exact copy of checkpoint tensor ``source``.

    Export writes the copy next to its source; import checks that the two are equal (same
    dtype, shape and values) and keeps one. ``name`` may hold ``{i}``: one copy per extra
    checkpoint layer (``num_layers`` to ``num_hf_layers - 1``, see :class:`Rule`'s ``{k}``).
    ``when`` as for :class:`Rule` (per-layer flags hold per extra layer). DeepSeek-V3's
    multi-token prediction layers repeat the embedding and the output head this way, and the
    loaders of vLLM and SGLang read them there.
    """

    name: str
    source: str
    when: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if "{i}" in self.source or "{j}" in self.source or "{j}" in self.name:
            raise ValueError(
                f"copy {self.name!r} of {self.source!r}: the source is one fixed checkpoint "
                "name and only the copy may hold '{i}' (one per extra layer)"
            )

    def names(self, ctx: Mapping[str, Any], layers: Iterable[int]) -> list[str]:
        """The copy's concrete names: once, or once per extra layer in ``layers``."""
        if "{i}" not in self.name:
            return [self.name] if _flag(self.when, ctx) else []
        return [self.name.format(i=i) for i in layers if _flag(self.when, ctx, i)]


@dataclass(frozen=True)
class BoundRule:
    """A :class:`Rule` with its layer index filled in: concrete names on both sides.

    ``hf`` ends with the copies (:class:`HFCopy`) of the rule's own checkpoint tensors;
    ``copy_of`` gives, for each copy, the index of its source among the rule's own names.
    """

    forge: str
    hf: tuple[str, ...]
    rule: Rule
    copy_of: tuple[int, ...] = ()

    @property
    def own(self) -> tuple[str, ...]:
        """The rule's own checkpoint names (``hf`` without the copies)."""
        return self.hf[: len(self.hf) - len(self.copy_of)]

    def with_copy(self, name: str, source: str) -> BoundRule:
        return BoundRule(
            self.forge, (*self.hf, name), self.rule, (*self.copy_of, self.own.index(source))
        )

    def _own_parts(self, parts: Sequence[Any]) -> Sequence[Any]:
        n = len(self.own)
        for name, k, copy in zip(self.hf[n:], self.copy_of, parts[n:], strict=True):
            self._check_copy(name, self.own[k], parts[k], copy)
        return parts[:n]

    @staticmethod
    def _check_copy(name: str, source: str, want: Any, got: Any) -> None:
        if isinstance(want, torch.Tensor):
            same = identical(want, got)
            what = "values"
        else:  # shapes (check_hf)
            same, what = tuple(want) == tuple(got), f"shape {list(got)} vs {list(want)}"
        if not same:
            raise ValueError(
                f"checkpoint tensor {name} should be an exact copy of {source}, but its {what} "
                f"differ: the checkpoint is inconsistent. Overwrite {name} with {source} (or "
                "re-export the checkpoint) so that both hold the same weights"
            )

    def to_forge(self, parts: Sequence[torch.Tensor], ctx: Mapping[str, Any]) -> torch.Tensor:
        parts = self._own_parts(parts)
        t = parts[0] if self.rule.concat is None else self.rule.concat.join(parts, ctx)
        for transform in self.rule.transforms:
            t = transform.to_forge(t, ctx)
        return t

    def to_forge_into(
        self, out: torch.Tensor, parts: Sequence[torch.Tensor], ctx: Mapping[str, Any]
    ) -> None:
        """:meth:`to_forge` copied into ``out`` (cast to its dtype and device), in place.

        A joined tensor without further transforms is written part by part into ``out``
        (one pass over the data, no intermediate joined tensor).
        """
        concat = self.rule.concat
        if concat is not None and not self.rule.transforms:
            concat.join_into(out, self._own_parts(parts), ctx)
            return
        t = self.to_forge(parts, ctx)
        _check_out(out, tuple(t.shape))
        out.copy_(t)

    def part_views(
        self, out: torch.Tensor, shapes: Sequence[Shape], ctx: Mapping[str, Any]
    ) -> list[torch.Tensor] | None:
        """The view of ``out`` (the forge tensor) that each of the rule's own checkpoint
        tensors (of ``shapes``) fills, row-major; ``None`` when the rule transforms the joined
        tensor further (then use :meth:`to_forge_into`)."""
        if self.rule.transforms:
            return None
        if self.rule.concat is None:
            _check_out(out, tuple(shapes[0]))
            return [out]
        return self.rule.concat.part_views(out, [tuple(s) for s in shapes], ctx)

    def check_copies(self, parts: Sequence[torch.Tensor]) -> None:
        """Raise unless each copy (:class:`HFCopy`) among ``parts`` equals its source."""
        self._own_parts(parts)

    def to_hf(self, t: torch.Tensor, ctx: Mapping[str, Any]) -> list[torch.Tensor]:
        for transform in reversed(self.rule.transforms):
            t = transform.to_hf(t, ctx)
        concat = self.rule.concat
        own = [t] if concat is None else concat.split(t, len(self.own), ctx)
        # Copies get their own storage: safetensors refuses tensors that share memory.
        return own + [own[k].clone() for k in self.copy_of]

    def forge_shape(self, hf_shapes: Sequence[Shape], ctx: Mapping[str, Any]) -> Shape:
        """The forge shape these checkpoint shapes give (``ValueError`` if they cannot fit)."""
        hf_shapes = self._own_parts([tuple(s) for s in hf_shapes])
        shape = (
            tuple(hf_shapes[0])
            if self.rule.concat is None
            else self.rule.concat.joined_shape([tuple(s) for s in hf_shapes], ctx)
        )
        for transform in self.rule.transforms:
            shape = transform.forge_shape(shape, ctx)
        return shape

    def describe(self) -> str:
        steps = ([self.rule.concat.describe()] if self.rule.concat else []) + [
            t.describe() for t in self.rule.transforms
        ]
        how = f"  [{', '.join(steps)}]" if steps else ""
        copies = self.hf[len(self.own) :]
        also = f"  (copies, written on export, checked on import: {', '.join(copies)})"
        return f"{self.forge} <- {' + '.join(self.own)}{how}{also if copies else ''}"


# --------------------------------------------------------------------------------------------
# The spec
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MappingSpec:
    """How one model family's tensors map between a Hugging Face checkpoint and forge.

    Args:
        name: registry name (``"llama"``).
        hf_model_types: ``config.json`` ``model_type`` values this spec reads.
        rules: the tensor rules.
        context_keys: context key -> ``(config.json key, default)``; ``REQUIRED`` for no default.
            ``num_layers`` must be among them (it expands ``{i}``).
        derive: computes further context values from the others (e.g. the set of
            mixture-of-experts layers from ``mlp_only_layers`` and ``decoder_sparse_step``);
            caller options override them.
        layout_probes: ``(flag, name suffix)``: :meth:`detect_layout` sets the flag when a
            checkpoint tensor name ends with the suffix (e.g. stacked vs per-expert weights).
        ignored_hf: ``(checkpoint name, flag)``: the tensor may be present and is dropped when
            the context flag holds, or always for flag ``None`` (an ``lm_head.weight`` saved
            next to tied embeddings; RoPE ``inv_freq`` buffers older transformers saved). The
            name may contain ``{i}``.
        hf_copies: checkpoint tensors that are exact copies of others (:class:`HFCopy`).
        presence_probes: ``(flag, name suffix)`` as ``layout_probes``, for optional parts of a
            checkpoint (DeepSeek-V3's multi-token prediction layers, which transformers' config
            announces but does not save); read by :meth:`detect_context` only.
        hf_shapes: ``(config.json, context) -> {checkpoint name: shape}``: the shapes the
            config implies (names may contain ``{i}``; names left out are not checked). A
            one-to-one rule (a plain copy) cannot see a mis-shaped tensor from the others, so
            :meth:`check_hf` compares against these when given the config.
        description: one line for listings.

    Optional context keys the spec reads: ``num_hf_layers`` (checkpoint layers the rules map,
    default ``num_layers``; the rules with ``{k}`` map those after ``num_layers``) and
    ``ignored_hf_layers`` (extra checkpoint layers whose tensors are dropped on import, e.g.
    multi-token prediction modules a model built without them has no place for).
    """

    name: str
    hf_model_types: tuple[str, ...]
    rules: tuple[Rule, ...]
    context_keys: Mapping[str, tuple[str, Any]] = field(default_factory=dict)
    ignored_hf: tuple[tuple[str, str | None], ...] = ()
    description: str = ""
    derive: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None
    layout_probes: tuple[tuple[str, str], ...] = ()
    hf_copies: tuple[HFCopy, ...] = ()
    presence_probes: tuple[tuple[str, str], ...] = ()
    hf_shapes: Callable[[Mapping[str, Any], Mapping[str, Any]], Mapping[str, Shape]] | None = None

    def __post_init__(self) -> None:
        if not all(isinstance(c, HFCopy) for c in self.hf_copies):
            raise TypeError(f"mapping {self.name!r}: hf_copies must be HFCopy(...) entries")
        if "num_layers" not in self.context_keys and any(r.per_layer for r in self.rules):
            raise ValueError(
                f"mapping {self.name!r}: per-layer rules need context key 'num_layers'"
            )

    # -- context ------------------------------------------------------------------------------
    def context(self, hf_config: Mapping[str, Any], **options: Any) -> dict[str, Any]:
        """The context of a checkpoint: values read from its ``config.json`` plus ``options``.

        ``vocab_pad_multiple`` defaults to 1 (no padding); ``options`` override config values.
        """
        ctx: dict[str, Any] = {"vocab_pad_multiple": 1}
        for key, (config_key, default) in self.context_keys.items():
            if config_key in hf_config and hf_config[config_key] is not None:
                ctx[key] = hf_config[config_key]
            elif default is REQUIRED:
                raise ValueError(
                    f"config.json lacks {config_key!r}, which the {self.name} mapping needs"
                )
            else:
                ctx[key] = default
        ctx.update(options)
        if self.derive is not None:
            for key, value in self.derive(ctx).items():
                if key not in options:
                    ctx[key] = value
        return ctx

    def detect_layout(self, hf_names: Iterable[str]) -> dict[str, bool]:
        """Context options read from a checkpoint's tensor names (see ``layout_probes``)."""
        names = list(hf_names)
        return {flag: any(n.endswith(suffix) for n in names) for flag, suffix in self.layout_probes}

    def _extra_layers(self, ctx: Mapping[str, Any]) -> range:
        """Checkpoint layers after the model's that the ``{k}`` rules map."""
        n = int(ctx["num_layers"])
        return range(n, int(ctx.get("num_hf_layers", n)))

    def _bind_layer(self, ctx: Mapping[str, Any], i: int, extra: bool) -> list[BoundRule]:
        return [
            b
            for r in self.rules
            if r.per_layer and r.extra_layer == extra and _flag(r.when, ctx, i)
            for b in r.bind_each(ctx, i)
        ]

    def detect_context(self, hf_names: Iterable[str]) -> dict[str, bool]:
        """:meth:`detect_layout` plus the ``presence_probes``: the options a checkpoint's tensor
        names give (pass them to :meth:`context`)."""
        names = list(hf_names)
        probes = self.presence_probes
        found = {flag: any(n.endswith(suffix) for n in names) for flag, suffix in probes}
        return self.detect_layout(names) | found

    def bind(self, ctx: Mapping[str, Any]) -> list[BoundRule]:
        """Every rule that applies in ``ctx``, with layer indices filled in (copies attached)."""
        rules = list(self.rules)
        layered = [r for r in rules if r.per_layer]
        first = rules.index(layered[0]) if layered else len(rules)
        # Global rules before the first per-layer one, then layer by layer (the model's, then
        # the extra checkpoint layers), then the rest.
        bound = [
            b
            for r in rules[:first]
            if not r.per_layer and _flag(r.when, ctx)
            for b in r.bind_each(ctx)
        ]
        for i in range(int(ctx["num_layers"]) if layered else 0):
            bound += self._bind_layer(ctx, i, extra=False)
        extra = any(r.extra_layer for r in layered)
        for i in self._extra_layers(ctx) if extra else ():
            bound += self._bind_layer(ctx, i, extra=True)
        bound += [
            b
            for r in rules[first:]
            if not r.per_layer and _flag(r.when, ctx)
            for b in r.bind_each(ctx)
        ]
        if self.hf_copies:
            bound = self._attach_copies(bound, ctx)
        forge_names = [b.forge for b in bound]
        hf_names = [n for b in bound for n in b.hf]
        for names, side in ((forge_names, "forge"), (hf_names, "checkpoint")):
            if len(set(names)) != len(names):
                dup = sorted({n for n in names if names.count(n) > 1})
                raise ValueError(f"mapping {self.name!r} maps {side} names twice: {dup[:5]}")
        return bound

    def _attach_copies(self, bound: list[BoundRule], ctx: Mapping[str, Any]) -> list[BoundRule]:
        owner = {n: k for k, b in enumerate(bound) for n in b.own}
        for copy in self.hf_copies:
            for name in copy.names(ctx, self._extra_layers(ctx)):
                if copy.source not in owner:
                    raise ValueError(
                        f"mapping {self.name!r}: {name} is declared a copy of {copy.source}, "
                        "which no rule maps in this context (give the copy a matching `when`)"
                    )
                k = owner[copy.source]
                bound[k] = bound[k].with_copy(name, copy.source)
        return bound

    def forge_names(self, ctx: Mapping[str, Any]) -> list[str]:
        return [b.forge for b in self.bind(ctx)]

    def hf_names(self, ctx: Mapping[str, Any]) -> list[str]:
        """Every checkpoint name the mapping reads and writes in ``ctx`` (copies included)."""
        return [n for b in self.bind(ctx) for n in b.hf]

    def _ignored(self, ctx: Mapping[str, Any]) -> set[str]:
        names: set[str] = set()
        for name, flag in self.ignored_hf:
            if not _flag(flag, ctx):
                continue
            if "{i}" in name:
                names.update(name.format(i=i) for i in range(int(ctx["num_layers"])))
            else:
                names.add(name)
        return names | self._ignored_layer_names(ctx)

    def _ignored_layer_names(self, ctx: Mapping[str, Any]) -> set[str]:
        """The tensors of the extra checkpoint layers in ``ignored_hf_layers`` (and copies)."""
        layers = sorted(int(i) for i in ctx.get("ignored_hf_layers", ()))
        names = {n for i in layers for b in self._bind_layer(ctx, i, extra=True) for n in b.hf}
        for copy in self.hf_copies:
            if "{i}" in copy.name:
                names.update(copy.names(ctx, layers))
        return names

    def _mismatch_context(self, unexpected: Iterable[str], ctx: Mapping[str, Any]) -> str:
        """The error's first line; names the checkpoint layers beyond those the mapping maps."""
        text = f"the checkpoint does not match the {self.name} model"
        prefixes = {n.split("{i}")[0] for r in self.rules if r.per_layer for n in r.hf}
        mapped = int(ctx.get("num_hf_layers", ctx.get("num_layers", 0)))
        beyond: set[int] = set()
        for name in unexpected:
            for prefix in prefixes:
                index = name[len(prefix) :].split(".")[0]
                if name.startswith(prefix) and index.isdigit() and int(index) >= mapped:
                    beyond.add(int(index))
        if not beyond:
            return text
        layers = ", ".join(str(i) for i in sorted(beyond))
        return (
            f"{text}: it has checkpoint layer(s) {layers} after the {mapped} this mapping "
            "converts (extra modules stored as layers, e.g. DeepSeek-V3's multi-token "
            "prediction, config num_nextn_predict_layers), and the mapping has no place for "
            "them in this context"
        )

    def describe(self, ctx: Mapping[str, Any]) -> str:
        """The mapping in ``ctx``, one line per forge tensor (a dry run's printout)."""
        lines = [f"mapping {self.name} ({', '.join(f'{k}={v}' for k, v in sorted(ctx.items()))})"]
        lines += [f"  {b.describe()}" for b in self.bind(ctx)]
        lines += [f"  (ignored if present: {n})" for n, _ in self.ignored_hf]
        lines += [
            f"  (ignored: checkpoint layer {i}, not loaded into this model)"
            for i in sorted(int(i) for i in ctx.get("ignored_hf_layers", ()))
        ]
        return "\n".join(lines)

    # -- validation ---------------------------------------------------------------------------
    def expected_hf_shapes(
        self, hf_config: Mapping[str, Any], ctx: Mapping[str, Any]
    ) -> dict[str, Shape]:
        """Checkpoint name -> the shape ``config.json`` implies, for the names the mapping
        binds in ``ctx`` that :attr:`hf_shapes` describes (empty without it)."""
        if self.hf_shapes is None:
            return {}
        patterns = self.hf_shapes(hf_config, ctx)
        layers = range(int(ctx.get("num_layers", 0)))
        wanted: dict[str, Shape] = {}
        for pattern, shape in patterns.items():
            for name in {pattern.format(i=i) for i in layers} if "{i}" in pattern else {pattern}:
                wanted[name] = tuple(int(x) for x in shape)
        bound = {n for b in self.bind(ctx) for n in b.own}
        return {n: shape for n, shape in wanted.items() if n in bound}

    def check_hf(
        self,
        hf_shapes: Mapping[str, Sequence[int]],
        ctx: Mapping[str, Any],
        forge_shapes: Mapping[str, Sequence[int]] | None = None,
        *,
        hf_config: Mapping[str, Any] | None = None,
        hf_dtypes: Mapping[str, Any] | None = None,
    ) -> None:
        """Raise :class:`CheckpointMismatchError` unless the checkpoint fits.

        ``hf_shapes``: checkpoint name -> shape (from the headers). ``forge_shapes``: the
        shapes the forge model expects (its ``state_dict``); when given, each mapped tensor's
        shape is checked and model tensors that no rule fills are reported. ``hf_config``: the
        checkpoint's ``config.json``; when given, each tensor is checked against the shape it
        implies (:meth:`expected_hf_shapes`): the check for a converter that has no model to
        compare with. ``hf_dtypes``: checkpoint name -> dtype (torch dtype or safetensors
        code); every tensor a mapping fills is a floating-point weight, so an integer or
        boolean one is refused (a copy would silently turn it into float values).
        """
        bound = self.bind(ctx)
        expected = {n for b in bound for n in b.hf}
        present = set(hf_shapes)
        missing = sorted(expected - present)
        unexpected = sorted(present - expected - self._ignored(ctx))
        mismatched = []
        by_config = self.expected_hf_shapes(hf_config, ctx) if hf_config is not None else {}
        wrong_dtype = sorted(
            (n, str(hf_dtypes[n]))
            for n in expected
            if hf_dtypes is not None and n in hf_dtypes and not _is_floating(hf_dtypes[n])
        )
        for b in bound:
            if not all(n in hf_shapes for n in b.hf):
                continue
            sources = [tuple(hf_shapes[n]) for n in b.hf]
            off = [
                (n, tuple(hf_shapes[n]), by_config[n])
                for n in b.own
                if n in by_config and tuple(hf_shapes[n]) != by_config[n]
            ]
            if off:  # the config's shape is the clearer message than what the join says
                mismatched += [(f"{n} (shape from config.json)", got, want) for n, got, want in off]
                continue
            label = b.forge if b.hf == (b.forge,) else f"{b.forge} (from {' + '.join(b.hf)})"
            try:
                shape = b.forge_shape(sources, ctx)
            except ValueError as exc:
                mismatched.append((f"{label}: {exc}", sources[0], ()))
                continue
            if forge_shapes is not None and b.forge in forge_shapes:
                want = tuple(forge_shapes[b.forge])
                if shape != want:
                    mismatched.append((label, shape, want))
        if forge_shapes is not None:
            produced = {b.forge for b in bound}
            missing += [
                f"{n} (a model tensor no rule of mapping {self.name!r} fills)"
                for n in sorted(set(forge_shapes) - produced)
            ]
        if missing or unexpected or mismatched or wrong_dtype:
            raise CheckpointMismatchError(
                missing=missing,
                unexpected=unexpected,
                mismatched=mismatched,
                wrong_dtype=wrong_dtype,
                context=self._mismatch_context(unexpected, ctx),
            )

    def check_forge(
        self, forge_shapes: Mapping[str, Sequence[int]], ctx: Mapping[str, Any]
    ) -> None:
        """Raise :class:`CheckpointMismatchError` unless ``forge_shapes`` has exactly the mapped names."""
        produced = set(self.forge_names(ctx))
        missing = sorted(produced - set(forge_shapes))
        unexpected = sorted(set(forge_shapes) - produced)
        if missing or unexpected:
            raise CheckpointMismatchError(
                missing=missing,
                unexpected=unexpected,
                context=f"the forge state does not match the {self.name} mapping",
            )

    # -- conversion ---------------------------------------------------------------------------
    def hf_to_forge(
        self, items: Iterable[tuple[str, torch.Tensor]], ctx: Mapping[str, Any]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Checkpoint ``(name, tensor)`` pairs -> forge pairs, streaming.

        A forge tensor is yielded as soon as all its parts arrived (parts of a fused tensor
        that sit in different shards wait in a small buffer; so does a tensor whose copy, see
        :class:`HFCopy`, comes later, and a copy that differs from its source raises
        ``ValueError``). Unknown names raise at once; missing ones when the input is exhausted.
        """
        for b, parts in self.hf_to_forge_parts(items, ctx):
            yield b.forge, b.to_forge(parts, ctx)

    def hf_to_forge_parts(
        self, items: Iterable[tuple[str, torch.Tensor]], ctx: Mapping[str, Any]
    ) -> Iterator[tuple[BoundRule, list[torch.Tensor]]]:
        """:meth:`hf_to_forge` before the join: ``(bound rule, its checkpoint tensors)`` as
        soon as all parts arrived, for a loader that writes them straight into place
        (:meth:`BoundRule.to_forge_into`). Same checks as :meth:`hf_to_forge`."""
        bound = self.bind(ctx)
        slots = {name: (b, k) for b in bound for k, name in enumerate(b.hf)}
        ignored = self._ignored(ctx)
        waiting: dict[str, list[torch.Tensor | None]] = {}
        done: set[str] = set()
        for name, tensor in items:
            if name in ignored:
                continue
            if name not in slots:
                raise CheckpointMismatchError(
                    unexpected=[name], context=self._mismatch_context([name], ctx)
                )
            b, k = slots[name]
            if not tensor.is_floating_point():
                raise CheckpointMismatchError(
                    wrong_dtype=[(name, str(tensor.dtype))],
                    context=f"the checkpoint does not match the {self.name} model",
                )
            if b.forge in done:
                raise ValueError(f"checkpoint tensor {name} is given twice")
            parts = waiting.setdefault(b.forge, [None] * len(b.hf))
            if parts[k] is not None:
                raise ValueError(f"checkpoint tensor {name} is given twice")
            parts[k] = tensor
            if all(p is not None for p in parts):
                del waiting[b.forge]
                done.add(b.forge)
                yield b, parts
        missing = []
        for b in bound:
            if b.forge not in done:
                parts = waiting.get(b.forge)
                missing += [n for k, n in enumerate(b.hf) if parts is None or parts[k] is None]
        if missing:
            raise CheckpointMismatchError(
                missing=missing, context=f"the checkpoint does not match the {self.name} model"
            )

    def forge_to_hf(
        self, items: Iterable[tuple[str, torch.Tensor]], ctx: Mapping[str, Any]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Forge ``(name, tensor)`` pairs -> checkpoint pairs, streaming (the inverse)."""
        bound = {b.forge: b for b in self.bind(ctx)}
        done: set[str] = set()
        for name, tensor in items:
            b = bound.get(name)
            if b is None:
                raise CheckpointMismatchError(
                    unexpected=[name],
                    context=f"the forge state does not match the {self.name} mapping",
                )
            if name in done:
                raise ValueError(f"forge tensor {name} is given twice")
            done.add(name)
            yield from zip(b.hf, b.to_hf(tensor, ctx), strict=True)
        missing = sorted(set(bound) - done)
        if missing:
            raise CheckpointMismatchError(
                missing=missing, context=f"the forge state does not match the {self.name} mapping"
            )
