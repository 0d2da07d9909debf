"""Tensor (and sequence) parallelism from a declarative plan.

A :class:`TPPlan` is data: module-path patterns mapped to style names, plus the attributes that
must shrink with the tensor-parallel degree (local head counts), plus the sequence-parallel
switch. :func:`apply_tp` validates it against the model (every error names the numbers and the
valid degrees) and applies it with ``torch.distributed.tensor.parallel.parallelize_module``.

Tensor parallelism is Megatron-LM's (Shoeybi et al. 2019, "Megatron-LM: Training Multi-Billion
Parameter Language Models Using Model Parallelism"): column-parallel projections into the
attention heads / MLP hidden units, row-parallel projections out. Sequence parallelism
(Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models") keeps
the activations between blocks sharded along the sequence: norms run on sequence shards, the
row-parallel all-reduce becomes a reduce-scatter and each block gathers its input once.

Style names (``sp`` = ``plan.sequence_parallel``):

==================================  =========================================================
``colwise``                         ``ColwiseParallel()``; the input must be replicated (under
                                    sp, an ancestor must be a ``block_input``)
``colwise_packed`` / ``..:N``       column parallel over N equal stacked sub-matrices (fused
                                    ``gate_up_proj``: N=2), see :mod:`forge_parallel.tp_styles`
``colwise_packed:a,b,..``           stacked sub-matrices in the proportions ``a:b:..`` (any
                                    unit: features, or heads as ``4,2,2`` for a grouped-query
                                    ``qkv_proj`` of 4 query and 2 key/value heads); each part
                                    split over tp. Unequal parts keep the weight replicated
                                    (each rank computes its slice of every part)
``rowwise``                         ``RowwiseParallel``; output replicated, or sequence-sharded
                                    under sp (reduce-scatter)
``colwise_output_replicated``       column parallel, output all-gathered (e.g. an ``lm_head``
                                    feeding an ordinary loss)
``loss_parallel``                   column parallel ``lm_head`` with vocab-sharded
                                    ``Shard(-1)`` DTensor logits: compute the cross-entropy
                                    inside ``torch.distributed.tensor.parallel.loss_parallel()``
``vocab_parallel_embedding``        ``RowwiseParallel`` on ``nn.Embedding`` (vocab-sharded table,
                                    replicated token ids); output replicated, or
                                    sequence-sharded under sp
``sequence_parallel``               ``SequenceParallel`` (norms on sequence shards); no-op
                                    without sp
``block_input``                     the input of a block of column-parallel layers (attention,
                                    MLP): all-gathered from sequence shards under sp, else
                                    marked replicated; either way the block's projections
                                    reduce their input gradient once, not once each
``sequence_scatter``                split a replicated input into sequence shards; no-op
                                    without sp
``replicate``                       every weight of the module (and its submodules)
                                    replicated, the module run on its local input: under sp
                                    on this rank's sequence shard, weight gradients summed
                                    over tp (e.g. a mixture-of-experts block, its router)
``replicate_partial``               weights replicated, the module run on this rank's part of
                                    the heads (a per-head norm behind column-parallel
                                    projections, e.g. Qwen3's ``q_norm`` / ``k_norm``): weight
                                    gradients summed over tp, with or without sp
``gathered_input``                  the input of a block mixing replicated and column-parallel
                                    layers in its own code (multi-head latent attention), as
                                    a plain whole-sequence tensor: all-gathered under sp, its
                                    gradient assumed whole (already reduced inside)
``reduce_grad``                     Megatron's ``f`` on the module's output: identity forward,
                                    gradient all-reduced over tp (a tensor every head shard
                                    reads, e.g. MLA's shared rotary key)
``adapter:colwise`` /               a wrapper of an ``nn.Linear`` ``base`` with a low-rank
``adapter:colwise_packed[:N]`` /    update (LoRA's ``lora_A`` ``[r, in]``, ``lora_B``
``adapter:rowwise``                 ``[out, r]``) split as its base would be, the adapters
                                    placed to match (:mod:`forge_parallel.tp_adapter`)
==================================  =========================================================

A plan value may also be a ``ParallelStyle`` instance, used as given (and not checked: the
way to shard a module whose name says fused projection, :data:`FUSED_PROJECTION_NAMES`, as
plain columns when it is not one, e.g. ``ColwiseParallel()``).

Patterns match module names segment by segment (``fnmatch`` within each dot-separated segment):
``layers.*.attn.q_proj`` matches ``layers.0.attn.q_proj`` but not ``layers.0.x.attn.q_proj``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Literal

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

from forge_parallel.tp_adapter import LinearAdapterParallel
from forge_parallel.tp_styles import (
    BlockInput,
    GatheredInput,
    PackedColwiseParallel,
    ReduceGradient,
    ReplicateParallel,
    SequenceScatter,
    SequenceShardingEmbedding,
)

__all__ = [
    "FUSED_PROJECTION_NAMES",
    "TP_STYLES",
    "TPPlan",
    "apply_tp",
    "match_modules",
    "resolve_plan",
    "valid_tp_degrees",
    "validate_tp",
]

TP_STYLES = (
    "colwise",
    "colwise_packed",
    "rowwise",
    "colwise_output_replicated",
    "loss_parallel",
    "vocab_parallel_embedding",
    "sequence_parallel",
    "block_input",
    "sequence_scatter",
    "replicate",
    "replicate_partial",
    "gathered_input",
    "reduce_grad",
)
_LINEAR_STYLES = {
    "colwise",
    "colwise_packed",
    "rowwise",
    "colwise_output_replicated",
    "loss_parallel",
}
_SP_ONLY = {"sequence_parallel", "sequence_scatter"}
#: ``adapter:<style>``: the style of a wrapper (LoRA layer) around the linear layer ``base``.
_ADAPTER = "adapter:"
_ADAPTABLE = {"colwise", "colwise_packed", "rowwise"}

#: Module names (last segment) of well-known fused projections: several projections stacked
#: along the output features (``[q; k; v]``, ``[gate; up]``). Plain ``colwise`` would give
#: each rank whole parts instead of a slice of each (rank 0 all of ``gate``, rank 1 all of
#: ``up``), which trains wrong without an error, so it is refused on these names.
FUSED_PROJECTION_NAMES = frozenset(
    {
        "qkv_proj",  # Phi3, Phi4
        "qkv",  # ViTs (timm, Qwen2.5-VL's vision tower)
        "Wqkv",  # MPT, ModernBERT
        "wqkv",  # InternLM2
        "query_key_value",  # GPT-NeoX, Falcon, Bloom
        "W_pack",  # Baichuan
        "c_attn",  # GPT-2, StarCoder
        "gate_up_proj",  # Phi3, forge-models' MLP
        "w13",  # fused SwiGLU w1/w3
    }
)

AttributeAction = Literal["divide", "check"]


@dataclass(frozen=True, kw_only=True)
class TPPlan:
    """A tensor-parallel plan: what to shard, how, and which attributes shrink with it.

    ``styles``: module-path pattern -> style name (see the module docstring) or a
    ``ParallelStyle``. ``attributes``: module-path pattern -> ``{attribute path: action}``,
    where ``"divide"`` divides an integer attribute by the TP degree in place (local head
    counts: ``{"layers.*.attn": {"num_heads": "divide", "num_kv_heads": "divide"}}``) and
    ``"check"`` only requires divisibility (e.g. ``"config.num_key_value_heads"`` of a
    ``transformers`` attention, which derives local head counts from tensor shapes).
    ``sequence_parallel`` switches the layouts between blocks to sequence shards.
    """

    styles: Mapping[str, str | ParallelStyle]
    attributes: Mapping[str, Mapping[str, AttributeAction]] = field(default_factory=dict)
    sequence_parallel: bool = False

    def __post_init__(self) -> None:
        for pattern, style in self.styles.items():
            if isinstance(style, ParallelStyle):
                continue
            if not isinstance(style, str) or _parse_style(style) is None:
                raise ValueError(
                    f"unknown tensor-parallel style {style!r} for {pattern!r}; styles are "
                    f"{', '.join(TP_STYLES)} (colwise_packed:N for N equal packed "
                    "sub-matrices, colwise_packed:a,b,c for parts in the proportions a:b:c; "
                    "adapter:colwise, adapter:colwise_packed[:N] or adapter:rowwise for a LoRA "
                    "wrapper of a linear layer) or a ParallelStyle instance"
                )
        for pattern, actions in self.attributes.items():
            for attr, action in actions.items():
                if action not in ("divide", "check"):
                    raise ValueError(
                        f"attribute action for {pattern}.{attr} must be 'divide' or 'check', "
                        f"got {action!r}"
                    )

    @property
    def uses_loss_parallel(self) -> bool:
        return any(style == "loss_parallel" for style in self.styles.values())

    def with_sequence_parallel(self, enabled: bool = True) -> TPPlan:
        return TPPlan(styles=self.styles, attributes=self.attributes, sequence_parallel=enabled)

    @classmethod
    def coerce(cls, plan: TPPlan | Mapping[str, str | ParallelStyle]) -> TPPlan:
        if isinstance(plan, TPPlan):
            return plan
        if isinstance(plan, Mapping):
            return cls(styles=dict(plan))
        raise ValueError(f"plan must be a TPPlan or a mapping of pattern -> style, got {plan!r}")


def _parse_style(name: str) -> tuple[str, int] | None:
    """``(style, chunks)``; an adapter style keeps its ``adapter:`` prefix."""
    adapter = name.startswith(_ADAPTER)
    base, _, arg = name.removeprefix(_ADAPTER).partition(":")
    if base not in TP_STYLES or (adapter and base not in _ADAPTABLE):
        return None
    prefix = _ADAPTER if adapter else ""
    if arg:
        sizes = arg.split(",")
        if base != "colwise_packed" or not all(a.isdigit() and int(a) >= 1 for a in sizes):
            return None
        if len(sizes) > 1 and adapter:
            return None  # a LoRA wrapper's adapters are placed for equal parts only
        return prefix + base, len(sizes) if len(sizes) > 1 else int(arg)
    return prefix + base, 2 if base == "colwise_packed" else 1


def _packed_proportions(name: str) -> tuple[int, ...] | None:
    """The ``a,b,..`` of ``colwise_packed:a,b,..``, or ``None`` for the other forms."""
    _, _, arg = name.partition(":")
    return tuple(int(a) for a in arg.split(",")) if "," in arg else None


def _packed_parts(name: str, out_features: int, style: str) -> tuple[int, ...] | None:
    """The part sizes in features of a ``colwise_packed:a,b,..`` linear of ``out_features``."""
    proportions = _packed_proportions(style)
    if proportions is None:
        return None
    total = sum(proportions)
    if out_features % total:
        raise ValueError(
            f"{name} has out_features={out_features}, which does not split in the proportions "
            f"{':'.join(map(str, proportions))} of {style!r} (their sum {total} must divide "
            "it); give the parts' sizes in features or in heads"
        )
    return tuple(p * (out_features // total) for p in proportions)


def _is_column_parallel(style: object) -> bool:
    """Whether ``style`` (a name) splits a linear layer's output features on a replicated
    input (``colwise``, ``colwise_packed[:N]``, their ``adapter:`` forms)."""
    parsed = _parse_style(style) if isinstance(style, str) else None
    return parsed is not None and parsed[0].removeprefix(_ADAPTER) in ("colwise", "colwise_packed")


def _pattern_matches(pattern: str, name: str) -> bool:
    parts, segments = pattern.split("."), name.split(".")
    return len(parts) == len(segments) and all(
        fnmatchcase(s, p) for p, s in zip(parts, segments, strict=True)
    )


def match_modules(model: nn.Module, pattern: str) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs of ``model`` whose names match ``pattern``."""
    return [(n, m) for n, m in model.named_modules() if n and _pattern_matches(pattern, n)]


def _no_match_error(model: nn.Module, pattern: str, what: str) -> ValueError:
    names = [n for n, _ in model.named_modules() if n][:8]
    return ValueError(
        f"{what} pattern {pattern!r} matches no module of {type(model).__name__}; module names "
        f"look like {', '.join(names)} (patterns match segment by segment, '*' within one)"
    )


def resolve_plan(model: nn.Module, plan: TPPlan) -> dict[str, str | ParallelStyle]:
    """Module name -> style, for every module a pattern matches (each at most once)."""
    resolved: dict[str, str | ParallelStyle] = {}
    source: dict[str, str] = {}
    for pattern, style in plan.styles.items():
        matches = match_modules(model, pattern)
        if not matches:
            raise _no_match_error(model, pattern, "tensor-parallel")
        for name, _ in matches:
            if name in resolved:
                raise ValueError(
                    f"module {name} is matched by both {source[name]!r} and {pattern!r} in the "
                    "tensor-parallel plan; make the patterns disjoint"
                )
            resolved[name] = style
            source[name] = pattern
    return resolved


@dataclass(frozen=True)
class _Constraint:
    value: int
    what: str  # e.g. "num_kv_heads=8 of layers.0.attn"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _constraints(model: nn.Module, plan: TPPlan) -> list[_Constraint]:
    modules = dict(model.named_modules())
    out: list[_Constraint] = []
    # Attributes first: a head count is the likeliest reason for a degree to fail.
    for pattern, actions in plan.attributes.items():
        matches = match_modules(model, pattern)
        if not matches:
            raise _no_match_error(model, pattern, "attribute")
        for name, module in matches:
            for attr in actions:
                value = _get_attr(module, attr, name)
                out.append(_Constraint(value, f"{attr}={value} of {name}"))
    for name, style in resolve_plan(model, plan).items():
        if isinstance(style, ParallelStyle):
            continue
        base, chunks = _parse_style(style)  # type: ignore[misc]
        module = modules[name]
        if base.startswith(_ADAPTER):
            linear = getattr(module, "base", None)
            if not isinstance(linear, nn.Linear):
                raise ValueError(
                    f"style {style!r} needs a wrapper whose 'base' is an nn.Linear (a LoRA "
                    f"layer), but {name} is {type(module).__name__}; use "
                    f"{style.removeprefix(_ADAPTER)!r} for a plain nn.Linear"
                )
            base, module, name = base.removeprefix(_ADAPTER), linear, f"{name}.base"
        if base in _LINEAR_STYLES and not isinstance(module, nn.Linear):
            raise ValueError(
                f"style {style!r} needs an nn.Linear, but {name} is {type(module).__name__}"
            )
        if base == "vocab_parallel_embedding" and not isinstance(module, nn.Embedding):
            raise ValueError(
                f"style 'vocab_parallel_embedding' needs an nn.Embedding, but {name} is "
                f"{type(module).__name__}"
            )
        if base == "colwise":
            _refuse_fused(name, style)
            out.append(
                _Constraint(module.out_features, f"out_features={module.out_features} of {name}")
            )
        elif base == "colwise_packed" and _packed_proportions(style) is not None:
            parts = _packed_parts(name, module.out_features, style)
            out.extend(
                _Constraint(p, f"the packed part {i} of size {p} ({style!r}) of {name}")
                for i, p in enumerate(parts)  # type: ignore[arg-type]
            )
        elif base == "colwise_packed":
            if module.out_features % chunks:
                raise ValueError(
                    f"{name} has out_features={module.out_features}, which does not split "
                    f"into {chunks} packed sub-matrices ({style!r})"
                )
            part = module.out_features // chunks
            out.append(
                _Constraint(part, f"the packed part size {part} (out_features/{chunks}) of {name}")
            )
        elif base == "rowwise":
            out.append(
                _Constraint(module.in_features, f"in_features={module.in_features} of {name}")
            )
    return out


def _refuse_fused(name: str, style: str) -> None:
    """Plain ``colwise`` on a module named like a fused projection trains wrong, silently."""
    last = name.removesuffix(".base").rpartition(".")[2]
    if last not in FUSED_PROJECTION_NAMES:
        return
    prefix = _ADAPTER if style.startswith(_ADAPTER) else ""
    raise ValueError(
        f"{name.removesuffix('.base')} is named like a fused projection ({last!r}: several "
        f"projections stacked along out_features), and {style!r} would give each tp rank whole "
        "parts instead of a slice of each. Use "
        f"'{prefix}colwise_packed:N' for N equal parts (2 for [gate; up], 3 for the q/k/v of "
        "multi-head attention) or 'colwise_packed:a,b,c' for parts in the proportions a:b:c "
        "(grouped-query q/k/v: the head counts, e.g. 'colwise_packed:32,8,8'); if it is not "
        "fused, give it the style instance ColwiseParallel() (ParallelStyle instances are used "
        "as given)"
    )


def _get_attr(module: nn.Module, path: str, name: str) -> int:
    obj: object = module
    for part in path.split("."):
        if not hasattr(obj, part):
            raise ValueError(
                f"{name} ({type(module).__name__}) has no attribute {path!r} named in the "
                "tensor-parallel plan's attributes"
            )
        obj = getattr(obj, part)
    if not isinstance(obj, int) or isinstance(obj, bool):
        raise ValueError(f"{name}.{path} must be an int to be divided by tp, got {obj!r}")
    return obj


def valid_tp_degrees(model: nn.Module, plan: TPPlan | Mapping[str, str]) -> list[int]:
    """Every tensor-parallel degree that the plan's shapes and attributes allow."""
    constraints = _constraints(model, TPPlan.coerce(plan))
    if not constraints:
        return [1]
    return _divisors(math.gcd(*(c.value for c in constraints)))


def validate_tp(
    model: nn.Module,
    plan: TPPlan | Mapping[str, str],
    tp: int,
    *,
    distributed_elsewhere: Sequence[str] = (),
) -> None:
    """Raise ``ValueError`` naming the numbers if ``plan`` cannot run at degree ``tp``.

    ``distributed_elsewhere``: names of modules whose parameters another dimension
    distributes over the tensor-parallel ranks (expert tensor parallelism under sequence
    parallelism), exempt from the check that every parameter has a style."""
    plan = TPPlan.coerce(plan)
    constraints = _constraints(model, plan)
    for c in constraints:
        if c.value % tp:
            valid = _divisors(math.gcd(*(x.value for x in constraints)))
            raise ValueError(
                f"tp={tp} does not divide {c.what}; valid tp degrees: {', '.join(map(str, valid))}"
            )
    if plan.sequence_parallel and tp > 1:
        resolved = resolve_plan(model, plan)
        gathered = [n for n, s in resolved.items() if s in ("block_input", "gathered_input")]
        for name, style in resolved.items():
            if _is_column_parallel(style) and not any(name.startswith(g + ".") for g in gathered):
                raise ValueError(
                    f"with sequence_parallel=True, {name} ({style}) would receive a "
                    "sequence-sharded input: mark the module that feeds it (e.g. its "
                    "attention or MLP block) 'block_input' in the plan"
                )
        _check_every_parameter_styled(model, {**resolved, **dict.fromkeys(distributed_elsewhere)})


def _check_every_parameter_styled(model: nn.Module, resolved: Mapping[str, object]) -> None:
    """Under sequence parallelism a module that no plan entry covers (itself or an ancestor)
    runs on a sequence shard with plain weights: its gradients would be one rank's partial sum,
    never reduced over tp. Name it instead of training it wrong."""
    for pname, _ in model.named_parameters():
        owner = pname.rpartition(".")[0]
        covering = [n for n in resolved if owner == n or owner.startswith(n + ".")]
        if not covering:
            raise ValueError(
                f"with sequence_parallel=True, parameter {pname} belongs to a module that no "
                "tensor-parallel plan entry covers: it would run on a sequence shard and its "
                "gradient would miss the other ranks' tokens. Give its module a style "
                f"('replicate' for {owner or 'the model'} or a module above it, "
                "'sequence_parallel' for a norm)"
            )
        nearest = max(covering, key=len)
        if resolved[nearest] == "block_input" and _norm_over_sharded_features(
            model, resolved, nearest, pname
        ):
            raise ValueError(
                f"parameter {pname} sits inside the 'block_input' block {nearest} without a "
                f"style of its own, and its {model.get_parameter(pname).numel()} features are "
                "the whole output of a column-parallel projection of that block: a norm over "
                "features that tensor parallelism splits (OLMo2's q_norm / k_norm over all "
                "heads), which cannot run on one rank's slice ('replicate_partial' fits a "
                "per-head norm only) and which no style shards yet. Train without tensor "
                "parallelism or, without sequence parallelism (a 'replicate' attention would "
                f"attend within its sequence shard), keep {nearest} whole ('replicate' on it, "
                "no styles inside it)"
            )
        if resolved[nearest] == "block_input":
            # Inside a block of column-parallel layers a module without a style of its own
            # runs on whatever the layers before it produce, e.g. a per-head norm on this
            # rank's heads, whose replicated weight then gets a partial gradient.
            raise ValueError(
                f"parameter {pname} sits inside the 'block_input' block {nearest} without a "
                "style of its own: its module would see this rank's slice of the heads or "
                "features and train on a partial gradient. Give it a style: 'replicate_partial' "
                "for a per-head norm (Qwen3's q_norm / k_norm), 'colwise' / 'rowwise' for a "
                "projection"
            )


def _norm_over_sharded_features(
    model: nn.Module, resolved: Mapping[str, object], block: str, pname: str
) -> bool:
    """Whether ``pname`` is a 1-D weight as long as the whole output of a column-parallel
    linear inside ``block``: a norm over all heads (OLMo2), not over one head (Qwen3)."""
    param = model.get_parameter(pname)
    if param.dim() != 1:
        return False
    for name, style in resolved.items():
        if name.startswith(block + ".") and _is_column_parallel(style):
            linear = model.get_submodule(name.removesuffix(".base"))
            linear = getattr(linear, "base", linear)
            if isinstance(linear, nn.Linear) and linear.out_features == param.numel():
                return True
    return False


def _build_style(style: str | ParallelStyle, sp: bool, name: str = "") -> ParallelStyle | None:
    if isinstance(style, ParallelStyle):
        return style
    base, chunks = _parse_style(style)  # type: ignore[misc]
    between = Shard(1) if sp else Replicate()  # layout of activations between blocks
    if base in _SP_ONLY and not sp:
        return None
    match base:
        case "colwise":
            return ColwiseParallel()
        case "colwise_packed" if _packed_proportions(style) is not None:
            return _ProportionalPacked(_packed_proportions(style))  # type: ignore[arg-type]
        case "colwise_packed":
            return PackedColwiseParallel(chunks)
        case "rowwise":
            return RowwiseParallel(output_layouts=between)
        case "colwise_output_replicated":
            return ColwiseParallel(input_layouts=between, output_layouts=Replicate())
        case "loss_parallel":
            return ColwiseParallel(
                input_layouts=between, output_layouts=Shard(-1), use_local_output=False
            )
        case "vocab_parallel_embedding" if sp:  # checks the ids' length before the cut
            return SequenceShardingEmbedding()
        case "vocab_parallel_embedding":
            return RowwiseParallel(input_layouts=Replicate(), output_layouts=between)
        case "sequence_parallel":
            # The norm runs on its local shard with local weights (gradients summed over tp),
            # not on DTensors: a fused kernel (forge-kernels' Triton RMSNorm) cannot take a
            # DTensor argument.
            return ReplicateParallel(sequence_parallel=True, name=name)
        case "block_input":
            return BlockInput(sequence_parallel=sp)
        case "sequence_scatter":
            return SequenceScatter()
        case "replicate":
            return ReplicateParallel(sequence_parallel=sp, name=name)
        case "replicate_partial":  # gradients summed over tp
            return ReplicateParallel(sequence_parallel=True, name=name)
        case "gathered_input":
            return GatheredInput(sequence_parallel=sp)
        case "reduce_grad":
            return ReduceGradient()
        case "adapter:colwise" | "adapter:colwise_packed":
            return LinearAdapterParallel("colwise", chunks=chunks, sequence_parallel=sp)
        case "adapter:rowwise":
            return LinearAdapterParallel("rowwise", sequence_parallel=sp)
    raise AssertionError(base)


class _ProportionalPacked(PackedColwiseParallel):
    """``colwise_packed:a,b,..``: the parts' sizes in features, read from the module."""

    def __init__(self, proportions: tuple[int, ...]) -> None:
        super().__init__(len(proportions))
        self.proportions = proportions

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        total = sum(self.proportions)
        parts = tuple(p * (module.out_features // total) for p in self.proportions)
        return PackedColwiseParallel(parts=parts)._apply(module, device_mesh)


def apply_tp(
    model: nn.Module,
    tp_mesh: DeviceMesh,
    plan: TPPlan | Mapping[str, str],
    *,
    distributed_elsewhere: Sequence[str] = (),
) -> dict[str, str]:
    """Validate and apply ``plan`` on the 1-D mesh ``tp_mesh``; returns module name -> style.

    Attributes marked ``"divide"`` are divided by the degree (once per module).
    ``distributed_elsewhere``: see :func:`validate_tp`.
    """
    plan = TPPlan.coerce(plan)
    tp = tp_mesh.size()
    validate_tp(model, plan, tp, distributed_elsewhere=distributed_elsewhere)
    applied: dict[str, str] = {}
    if tp == 1:
        return applied
    divided: set[tuple[int, str]] = set()  # an object shared by modules is divided once
    for pattern, actions in plan.attributes.items():
        for name, module in match_modules(model, pattern):
            for attr, action in actions.items():
                *parents, last = attr.split(".")
                owner: object = module
                for part in parents:
                    owner = getattr(owner, part)
                if action == "divide" and (id(owner), last) not in divided:
                    divided.add((id(owner), last))
                    setattr(owner, last, _get_attr(module, attr, name) // tp)
    modules = dict(model.named_modules())
    ties = _tied_parameters(model)
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    for name, style in resolve_plan(model, plan).items():
        built = _build_style(style, plan.sequence_parallel, name)
        if built is None:
            continue
        parallelize_module(modules[name], tp_mesh, built)
        applied[name] = style if isinstance(style, str) else type(style).__name__
    _retie(model, ties)
    # A style re-registers each parameter it distributes; one that makes a new Parameter
    # (torch's SequenceParallel does) would unfreeze a frozen weight (a LoRA run's base).
    for name in frozen:
        model.get_parameter(name).requires_grad_(False)
    return applied


def _tied_parameters(model: nn.Module) -> list[list[str]]:
    """Names of the parameters that are one tensor (tied embeddings and head), per tensor."""
    by_tensor: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(name)
    return [names for names in by_tensor.values() if len(names) > 1]


def _retie(model: nn.Module, ties: list[list[str]]) -> None:
    """Make tied parameters one tensor again after their modules were parallelized apart.

    Each module's style distributes its own copy, so ``lm_head.weight`` and
    ``embed_tokens.weight`` would train as two tensors. When both came out sharded alike (a
    vocab-parallel embedding and a column-parallel head both shard the ``[vocab, hidden]``
    matrix by rows) the first is put back in every place; otherwise tying cannot be kept.
    """
    for names in ties:
        params = [model.get_parameter(name) for name in names]
        first = params[0]
        layouts = [
            (tuple(p.placements), tuple(p.shape)) if isinstance(p, DTensor) else None
            for p in params
        ]
        if all(p is first for p in params):
            continue
        if any(layout != layouts[0] for layout in layouts):
            described = ", ".join(
                f"{n}: {'not sharded' if lay is None else lay[0]}"
                for n, lay in zip(names, layouts, strict=True)
            )
            raise ValueError(
                f"tied parameters {names} would be sharded differently ({described}); give their "
                "modules styles that shard the shared matrix alike (vocab_parallel_embedding with "
                "a colwise / colwise_output_replicated / loss_parallel head), or untie them "
                "(e.g. tie_word_embeddings=False)"
            )
        for name in names[1:]:
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            owner.register_parameter(attr, first)
