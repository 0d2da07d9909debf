"""Mappings of models made of parts: a vision tower, a projector, a language model.

A vision-language model checkpoint is several models side by side, each with its own
``config.json`` sub-dict (``vision_config``, ``text_config``) and its own layer count. A
:class:`ComposedMapping` reuses one :class:`~forge_ckpt.mapping.spec.MappingSpec` per
:class:`Part`, each bound in its own context, and renames the part's names by prefix on both
sides::

    ComposedMapping(
        name="qwen2_5_vl",
        hf_model_types=("qwen2_5_vl",),
        parts=(
            Part(name="vision", spec=QWEN2_5_VL_VISION, config=sub_config("vision_config"),
                 forge_prefix=(("projector.", "projector."), ("", "vision.")),
                 hf_prefix={"transformers": "visual.", "modules": "model.visual."}),
            Part(name="text", spec=QWEN2, config=language_model_config(...),
                 forge_prefix="language_model.",
                 hf_prefix={"transformers": "", "modules": (("model.", "model.language_model."),
                                                           ("lm_head.", "lm_head."))}),
        ),
        layouts={"transformers": "...", "modules": "..."},
    )

A prefix is a string (put in front of every name) or ``(part prefix, full prefix)`` pairs, the
first pair whose part prefix starts the name wins. ``hf_prefix`` gives one such renaming per
checkpoint *layout*: the same weights have been published under different names (the original
hub uploads, what transformers 5.23 ``save_pretrained`` writes, the module paths of
``model.state_dict()``). :meth:`ComposedMapping.detect_context` picks the layout whose names
fit the checkpoint best; the first layout is what a context without detection uses, so a forge
model saved with ``forge_models.save_pretrained`` is written in it. The context carries the
layout, so a conversion keeps the layout it read (``forge-convert hf-to-forge`` then
``forge-to-hf`` gives back the source bit for bit).

A part's spec may depend on its config: ``spec={"qwen2": QWEN2, "llama": LLAMA}`` picks the
spec by the ``model_type`` of the part's config dict (a LLaVA-style model takes any language
model).

The composed context is ``{"hf_layout": ..., "parts": {part: its spec's context}, "mappings":
{part: its spec's name}}``; options ``"<part>.<key>"`` go to one part, other options to every
part (``vocab_pad_multiple``). The bound rules (:class:`PartBoundRule`) find their part's
context in it, so every consumer of a ``MappingSpec`` (``check_hf``, ``hf_to_forge``,
``forge_to_hf``, ``bind`` for dry runs and checks, ``describe``) works unchanged, with the full
names in every error.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from forge_ckpt.errors import CheckpointMismatchError
from forge_ckpt.mapping.spec import BoundRule, MappingSpec

__all__ = [
    "ComposedMapping",
    "Part",
    "PartBoundRule",
    "Prefixes",
    "language_model_config",
    "sub_config",
]

#: A renaming by prefix: one prefix for every name, or ``(part prefix, full prefix)`` pairs,
#: first match wins.
Prefixes = str | tuple[tuple[str, str], ...]

ConfigFn = Callable[[Mapping[str, Any]], Mapping[str, Any]]

_LAYOUT, _PARTS, _MAPPINGS = "hf_layout", "parts", "mappings"


def _composed(ctx: Mapping[str, Any], key: str, part: str, what: str) -> Any:
    """Entry ``key`` of part ``part`` in a composed context."""
    entries = ctx.get(key)
    if not isinstance(entries, Mapping) or part not in entries:
        raise ValueError(
            f"{what}: the context is not a composed mapping's (no {key!r} entry for part "
            f"{part!r}); build it with the composed mapping's context()"
        )
    return entries[part]


def _pairs(prefix: Prefixes) -> tuple[tuple[str, str], ...]:
    return (("", prefix),) if isinstance(prefix, str) else tuple(prefix)


def _add_prefix(name: str, prefix: Prefixes, what: str) -> str:
    for short, full in _pairs(prefix):
        if name.startswith(short):
            return full + name[len(short) :]
    raise ValueError(
        f"{what}: name {name!r} starts with none of the prefixes "
        f"{[short for short, _ in _pairs(prefix)]}; add a pair for it (or a catch-all '')"
    )


def _strip_prefix(name: str, prefix: Prefixes) -> str | None:
    """The part name that :func:`_add_prefix` turns into ``name``, or ``None``."""
    for short, full in _pairs(prefix):
        if name.startswith(full):
            candidate = short + name[len(full) :]
            try:
                if _add_prefix(candidate, prefix, "") == name:
                    return candidate
            except ValueError:
                continue
    return None


# --------------------------------------------------------------------------------------------
# Config views
# --------------------------------------------------------------------------------------------


def sub_config(
    key: str | None, *, flat_fallback: bool = False, root_keys: Sequence[str] = ()
) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """The ``config.json`` dict a part's context reads: the sub-dict ``key`` (``None``: the root).

    ``flat_fallback``: use the root when ``key`` is absent (configs written before the model
    had sub-configs: the original Qwen2.5-VL uploads keep the text settings at the root).
    ``root_keys``: root settings copied into the view where present (InternVL's
    ``vision_feature_layer`` belongs to the vision tower's mapping but sits at the root).
    A config without ``key`` raises :class:`CheckpointMismatchError` (a checkpoint of another
    model).
    """

    def view(config: Mapping[str, Any]) -> dict[str, Any]:
        if key is None:
            out = dict(config)
        elif isinstance(config.get(key), Mapping):
            out = dict(config[key])
        elif flat_fallback:
            out = dict(config)
        else:
            raise CheckpointMismatchError(
                context=(
                    f"config.json (model_type {config.get('model_type')!r}) has no {key!r}: "
                    "the mapping is for a model made of parts, and this checkpoint is not one"
                )
            )
        out.update({k: config[k] for k in root_keys if config.get(k) is not None})
        return out

    return view


def language_model_config(
    *, tie_default: bool, tie_from_text: bool
) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """The language model's config view: ``text_config`` (or the root of a flat config) with the
    ``tie_word_embeddings`` transformers 5.23 applies to the whole model.

    transformers ties the output head to the embeddings by the *root* config's flag
    (``tie_default`` when absent); for Qwen2.5-VL and LLaVA-OneVision a ``True`` inside
    ``text_config`` ties too (``tie_from_text``: checkpoints saved before transformers 5 kept
    the flag there), for InternVL it does not.
    """
    text = sub_config("text_config", flat_fallback=True)

    def view(config: Mapping[str, Any]) -> dict[str, Any]:
        out = text(config)
        root = config.get("tie_word_embeddings")
        tied = tie_default if root is None else bool(root)
        if tie_from_text and isinstance(config.get("text_config"), Mapping):
            tied = tied or bool(config["text_config"].get("tie_word_embeddings", False))
        out["tie_word_embeddings"] = tied
        return out

    return view


# --------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Part:
    """One part of a composed model.

    Attributes:
        name: the part's name in the context and in options (``"vision"``, ``"text"``).
        spec: its mapping (names relative to the part on both sides), or ``model_type`` of the
            part's config dict -> mapping.
        config: ``config.json -> the dict the part's context reads`` (see :func:`sub_config`).
        forge_prefix: renaming of the spec's forge names into the whole model's.
        hf_prefix: layout name -> renaming of the spec's checkpoint names in that layout.
        options: ``config.json -> options`` for the part's spec: settings it takes as options
            rather than from its config dict (LLaVA's root ``vision_feature_layer``) and
            defaults of its own layout flags; the caller's options override them.
    """

    name: str
    spec: MappingSpec | Mapping[str, MappingSpec]
    config: ConfigFn
    forge_prefix: Prefixes
    hf_prefix: Mapping[str, Prefixes]
    options: ConfigFn | None = None

    def __post_init__(self) -> None:
        if not self.name or "." in self.name:
            raise ValueError(f"part name {self.name!r}: give a non-empty name without dots")
        if not self.hf_prefix:
            raise ValueError(f"part {self.name!r}: hf_prefix needs at least one layout")
        if not self.specs:
            raise ValueError(f"part {self.name!r}: give at least one mapping")

    @property
    def specs(self) -> tuple[MappingSpec, ...]:
        """Every mapping the part may use."""
        return (self.spec,) if isinstance(self.spec, MappingSpec) else tuple(self.spec.values())

    def spec_for(self, config: Mapping[str, Any]) -> MappingSpec:
        """The mapping for the part's config dict (by its ``model_type``, see ``spec``)."""
        if isinstance(self.spec, MappingSpec):
            return self.spec
        model_type = config.get("model_type")
        if model_type not in self.spec:
            raise CheckpointMismatchError(
                context=(
                    f"the {self.name} part's config has model_type {model_type!r}, which this "
                    f"mapping does not convert (supported: {sorted(self.spec)})"
                )
            )
        return self.spec[model_type]

    def spec_named(self, name: str) -> MappingSpec:
        return next(s for s in self.specs if s.name == name)

    def forge_name(self, name: str) -> str:
        return _add_prefix(name, self.forge_prefix, f"part {self.name!r} (forge)")

    def hf_name(self, name: str, layout: str) -> str:
        return _add_prefix(name, self.hf_prefix[layout], f"part {self.name!r} ({layout} layout)")

    def hf_patterns(self, layout: str) -> list[str]:
        """Every checkpoint name pattern of the part in ``layout`` (``{i}``, ``{j}`` unbound)."""
        names = []
        for spec in self.specs:
            names += [n for r in spec.rules for n in r.hf]
            names += [c.name for c in spec.hf_copies] + [n for n, _ in spec.ignored_hf]
        return [self.hf_name(n, layout) for n in names]


@dataclass(frozen=True)
class PartBoundRule(BoundRule):
    """A part's bound rule under the whole model's names; it converts in its part's context,
    which it finds in the composed context by ``part``."""

    part: str = ""

    def _ctx(self, ctx: Mapping[str, Any]) -> Mapping[str, Any]:
        return _composed(ctx, _PARTS, self.part, self.forge)

    def to_forge(self, parts: Sequence[torch.Tensor], ctx: Mapping[str, Any]) -> torch.Tensor:
        return super().to_forge(parts, self._ctx(ctx))

    def to_hf(self, t: torch.Tensor, ctx: Mapping[str, Any]) -> list[torch.Tensor]:
        return super().to_hf(t, self._ctx(ctx))

    def forge_shape(
        self, hf_shapes: Sequence[Sequence[int]], ctx: Mapping[str, Any]
    ) -> tuple[int, ...]:
        return super().forge_shape(hf_shapes, self._ctx(ctx))


# --------------------------------------------------------------------------------------------
# The composed mapping
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ComposedMapping(MappingSpec):
    """A :class:`MappingSpec` made of :class:`Part` s (see the module docstring).

    ``rules`` stays empty: the parts' specs hold the rules, each bound in its own context.
    ``layouts``: checkpoint layout name -> one line describing it (for listings and errors);
    every part gives a prefix for each; the first is the default.
    """

    rules: tuple = ()
    parts: tuple[Part, ...]
    layouts: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rules:
            raise ValueError(f"mapping {self.name!r}: a composed mapping keeps its rules in parts")
        if not self.parts or not self.layouts:
            raise ValueError(f"mapping {self.name!r}: give parts and layouts")
        names = [p.name for p in self.parts]
        if len(set(names)) != len(names):
            raise ValueError(f"mapping {self.name!r}: part names repeat: {names}")
        for part in self.parts:
            if set(part.hf_prefix) != set(self.layouts):
                raise ValueError(
                    f"mapping {self.name!r}: part {part.name!r} gives prefixes for layouts "
                    f"{sorted(part.hf_prefix)}, the mapping has {sorted(self.layouts)}"
                )

    @property
    def default_layout(self) -> str:
        return next(iter(self.layouts))

    # -- context ------------------------------------------------------------------------------
    def context(self, hf_config: Mapping[str, Any], **options: Any) -> dict[str, Any]:
        """The composed context (see the module docstring) of a ``config.json``.

        Options: ``hf_layout`` (default: the first layout), ``"<part>.<key>"`` for one part,
        any other key for every part.
        """
        layout = options.pop(_LAYOUT, self.default_layout)
        if layout not in self.layouts:
            raise ValueError(
                f"mapping {self.name!r} has no checkpoint layout {layout!r}; "
                f"choose from {list(self.layouts)}"
            )
        names = {p.name for p in self.parts}
        unknown = sorted(k for k in options if "." in k and k.split(".", 1)[0] not in names)
        if unknown:
            raise ValueError(
                f"options {unknown} name no part of mapping {self.name!r} (parts: {sorted(names)})"
            )
        shared = {k: v for k, v in options.items() if "." not in k}
        parts, mappings = {}, {}
        for part in self.parts:
            dotted = part.name + "."
            own = {k[len(dotted) :]: v for k, v in options.items() if k.startswith(dotted)}
            preset = {} if part.options is None else dict(part.options(hf_config))
            config = part.config(hf_config)
            spec = part.spec_for(config)
            parts[part.name] = spec.context(config, **{**preset, **shared, **own})
            mappings[part.name] = spec.name
        return {_LAYOUT: layout, _PARTS: parts, _MAPPINGS: mappings}

    def _part(self, ctx: Mapping[str, Any], part: Part) -> tuple[MappingSpec, Mapping[str, Any]]:
        """The part's spec and context in a composed context."""
        what = f"mapping {self.name!r}"
        spec = part.spec_named(_composed(ctx, _MAPPINGS, part.name, what))
        return spec, _composed(ctx, _PARTS, part.name, what)

    def _fits(self, names: Sequence[str]) -> dict[str, int]:
        """Layout -> how many of ``names`` it maps (or drops)."""
        fits = {}
        for layout in self.layouts:
            patterns = [p for part in self.parts for p in part.hf_patterns(layout)]
            alts = (re.sub(r"\\\{[ij]\\\}", r"\\d+", re.escape(p)) for p in patterns)
            regex = re.compile("|".join(f"(?:{a})" for a in alts))
            fits[layout] = sum(regex.fullmatch(n) is not None for n in names)
        return fits

    def detect_context(self, hf_names: Iterable[str]) -> dict[str, Any]:
        """Options from a checkpoint's names: the layout whose names fit best (ties: the earlier
        layout), plus each part's own detected options as ``"<part>.<key>"``."""
        names = list(hf_names)
        fits = self._fits(names)
        layout = max(self.layouts, key=lambda lay: fits[lay])  # the first of the best
        options: dict[str, Any] = {_LAYOUT: layout}
        for part in self.parts:
            own = [s for n in names if (s := _strip_prefix(n, part.hf_prefix[layout])) is not None]
            for spec in reversed(part.specs):  # the first spec's value wins
                for key, value in spec.detect_context(own).items():
                    options[f"{part.name}.{key}"] = value
        return options

    def detect_layout(self, hf_names: Iterable[str]) -> dict[str, Any]:
        """Same as :meth:`detect_context` (the layout is what the names tell)."""
        return self.detect_context(hf_names)

    # -- binding ------------------------------------------------------------------------------
    def bind(self, ctx: Mapping[str, Any]) -> list[BoundRule]:
        """Every part's bound rules, in part order, under the whole model's names."""
        layout = ctx.get(_LAYOUT, self.default_layout)
        bound: list[BoundRule] = []
        for part in self.parts:
            spec, part_ctx = self._part(ctx, part)
            bound += [
                PartBoundRule(
                    forge=part.forge_name(b.forge),
                    hf=tuple(part.hf_name(n, layout) for n in b.hf),
                    rule=b.rule,
                    copy_of=b.copy_of,
                    part=part.name,
                )
                for b in spec.bind(part_ctx)
            ]
        forge_names = [b.forge for b in bound]
        hf_names = [n for b in bound for n in b.hf]
        for names, side in ((forge_names, "forge"), (hf_names, "checkpoint")):
            if len(set(names)) != len(names):
                dup = sorted({n for n in names if names.count(n) > 1})
                raise ValueError(
                    f"mapping {self.name!r}: two parts map the same {side} names {dup[:5]}; "
                    "give the parts distinct prefixes"
                )
        return bound

    def _ignored(self, ctx: Mapping[str, Any]) -> set[str]:
        layout = ctx.get(_LAYOUT, self.default_layout)
        ignored = set()
        for part in self.parts:
            spec, part_ctx = self._part(ctx, part)
            ignored |= {part.hf_name(n, layout) for n in spec._ignored(part_ctx)}
        return ignored

    def _mismatch_context(self, unexpected: Iterable[str], ctx: Mapping[str, Any]) -> str:
        """The error's first line: each part's note on extra checkpoint layers, and the layout
        the unexpected names fit if it is not the context's."""
        unexpected = list(unexpected)
        layout = ctx.get(_LAYOUT, self.default_layout)
        notes = [f"the checkpoint does not match the {self.name} model ({layout} layout)"]
        for part in self.parts:
            spec, part_ctx = self._part(ctx, part)
            own = [s for n in unexpected if (s := _strip_prefix(n, part.hf_prefix[layout]))]
            plain = f"the checkpoint does not match the {spec.name} model"
            note = spec._mismatch_context(own, part_ctx) if own else plain
            if note != plain:
                notes.append(f"{part.name} part: {note.removeprefix(plain + ': ')}")
        fits = self._fits(unexpected) if unexpected else {}
        better = [lay for lay in self.layouts if fits and fits[lay] > fits[layout]]
        if better:
            best = max(better, key=lambda lay: fits[lay])
            notes.append(
                f"{fits[best]} unexpected name(s) fit the {best!r} layout "
                f"({self.layouts[best]}): build the context with "
                f"context(config, **detect_context(names)), or pass hf_layout={best!r}"
            )
        return "; ".join(notes)

    def describe(self, ctx: Mapping[str, Any]) -> str:
        """The mapping in ``ctx``, part by part, one line per forge tensor."""
        layout = ctx.get(_LAYOUT, self.default_layout)
        lines = [f"mapping {self.name} (checkpoint layout {layout}: {self.layouts[layout]})"]
        bound = self.bind(ctx)
        for part in self.parts:
            spec, part_ctx = self._part(ctx, part)
            settings = ", ".join(f"{k}={v}" for k, v in sorted(part_ctx.items()))
            lines.append(f"part {part.name}: mapping {spec.name} ({settings})")
            lines += [f"  {b.describe()}" for b in bound if getattr(b, "part", None) == part.name]
            lines += [
                f"  (ignored if present: {part.hf_name(n, layout)})" for n, _ in spec.ignored_hf
            ]
            lines += [
                f"  (ignored: checkpoint layer {i} of part {part.name}, not loaded into this model)"
                for i in sorted(int(i) for i in part_ctx.get("ignored_hf_layers", ()))
            ]
        return "\n".join(lines)
