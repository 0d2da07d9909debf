"""LoRA: low-rank adapters on frozen linear layers (Hu et al. 2021, "LoRA: Low-Rank Adaptation of
Large Language Models", arXiv:2106.09685).

``y = W x + (alpha / r) * B A dropout(x)`` with ``A [r, in]`` initialized like a linear layer
(Kaiming-uniform) and ``B [out, r]`` zero, so training starts from the base model exactly.
:func:`apply_lora` wraps the ``nn.Linear`` modules whose names match fnmatch patterns and
freezes every other parameter; :func:`merge_lora_state_dict` folds ``W + (alpha / r) B A`` into
a plain state dict for export, :func:`merge_lora_tensors` does it on a stream of tensors (the
streaming export), holding only a layer's weight and adapters until they are all there.

On a vision-language model (:func:`apply_vlm_lora`) the patterns match full module paths
(``language_model.*_proj``: every attention and MLP projection of the language model, as
LLaVA-1.5's LoRA recipe and PEFT's Qwen2.5-VL recipes adapt them). A part holding adapters has
its base weights frozen; a part without adapters trains whole unless ``train.freeze`` names it
(LLaVA's recipe trains the projector whole beside the language model's adapters).

Under tensor parallelism :func:`lora_tp_styles` gives each adapted layer forge-parallel's
``adapter:`` form of its base's style (:mod:`forge_parallel.tp_adapter`, after Megatron-Bridge's
``ParallelLinearAdapter``): ``A`` replicated and ``B`` split like the weight of a
column-parallel layer, ``A`` split like the weight and ``B`` replicated for a row-parallel one.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from forge_train.lora_dropout import KeyedDropout

__all__ = [
    "LoRALinear",
    "apply_lora",
    "apply_vlm_lora",
    "lora_bases",
    "lora_tp_plan",
    "lora_tp_styles",
    "merge_lora_state_dict",
    "merge_lora_tensors",
]


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` (``base``) plus a trainable rank-``rank`` update."""

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.rank = rank
        self.scaling = alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, rank, **factory))
        # Masks keyed by the data under forge-train (forge_train.lora_dropout), else drawn.
        self.dropout = KeyedDropout(dropout) if dropout > 0 else nn.Identity()
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        if not self.lora_A.is_meta:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``A`` as ``nn.Linear`` initializes its weight, ``B`` zero (Hu et al. 2021), with the
        values one process draws whatever the sharding (:func:`forge_models.init.init_`)."""
        from forge_models.init import init_, materialized_device

        init_(
            self.lora_A,
            lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5)),
            device=materialized_device(self),
        )
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()
        return self.base(x) + self.scaling * update


def apply_lora(
    model: nn.Module, *, targets: list[str], rank: int, alpha: float, dropout: float = 0.0
) -> list[str]:
    """Wrap every ``nn.Linear`` whose name matches one of ``targets`` in :class:`LoRALinear`, in
    place (numbered in module order: the index salting each layer's keyed dropout masks, see
    :mod:`forge_train.lora_dropout`), and freeze all other parameters; returns the wrapped
    module names."""
    matched = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(fnmatch.fnmatchcase(name, p) for p in targets)
    ]
    if not matched:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:6]
        raise ValueError(
            f"lora.targets {targets} match no linear layer; linear layers are named like "
            f"{', '.join(linears)}"
        )
    _refuse_tied(model, matched)
    _refuse_read_by_weight(model, matched)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer, (name, module) in enumerate(matched):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = LoRALinear(module, rank=rank, alpha=alpha, dropout=dropout)
        if isinstance(wrapped.dropout, KeyedDropout):
            # The layer's mask salt (forge_train.lora_dropout): its index in the whole model,
            # which a pipeline stage holding only some layers keeps.
            wrapped.dropout.layer = layer
        setattr(parent, child, wrapped)
    return [name for name, _ in matched]


def _refuse_tied(model: nn.Module, matched: list[tuple[str, nn.Module]]) -> None:
    """A ``ValueError`` if a matched layer's weight is tied to another module's parameter (a
    tied ``lm_head`` is the token embedding, ``tie_word_embeddings``): its adapter would train
    a separate head while the Hugging Face export keeps the tie, so the merge cannot be
    written (found at export, after the whole run)."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for name, module in matched:
        names = owners.get(id(module.weight), [])
        others = [n for n in names if n != (f"{name}.weight" if name else "weight")]
        if others:
            raise ValueError(
                f"lora.targets: {name!r} matches a layer whose weight is tied to {others[0]} "
                "(tie_word_embeddings: the output head shares the token embedding); a LoRA "
                "update of it cannot be merged into the tied export. Leave it out of "
                "lora.targets (e.g. drop 'lm_head'), or use a model with "
                "tie_word_embeddings=false"
            )


def _refuse_read_by_weight(model: nn.Module, matched: list[tuple[str, nn.Module]]) -> None:
    """A ``ValueError`` if a matched layer is one whose ``weight`` the model reads directly
    instead of calling the layer, so an adapter there would never run (and the model would fail
    on the wrapper's missing ``weight`` at the first step): a forge ``CausalLM``'s ``lm_head``,
    whose weight the fused linear cross-entropy reads (the logits are never materialized), and
    the router of a mixture-of-experts block with sigmoid scores (DeepSeek-V3), computed from
    its weight in float32."""
    for name, _ in matched:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if child == "lm_head" and hasattr(parent, "_lm_loss"):
            why = "the loss reads lm_head.weight directly (fused linear cross-entropy)"
        elif child == "router" and getattr(parent, "score_func", None) == "sigmoid":
            why = "sigmoid routing computes its scores from router.weight in float32"
        else:
            continue
        raise ValueError(
            f"lora.targets: {name!r} cannot take a LoRA adapter: {why}, so the adapter would "
            f"never run; leave {child!r} out of lora.targets (the attention and MLP projections "
            "are the usual targets)"
        )


def apply_vlm_lora(
    model: nn.Module,
    *,
    targets: list[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    frozen: list[str],
) -> list[str]:
    """:func:`apply_lora` on a ``forge_models.vlm.VisionLanguageModel``, ``targets`` matched
    against full module paths (``language_model.layers.0.attn.q_proj``). The parts holding
    adapters keep only them trainable; the other parts (``vision``, ``projector``,
    ``language_model``) train whole unless ``frozen`` (``train.freeze``) names them. Adapters in
    a frozen part are refused (``ValueError``): a frozen part trains nothing. Returns the
    wrapped module names."""
    from forge_models.vlm.model import COMPONENTS

    wrapped = apply_lora(model, targets=targets, rank=rank, alpha=alpha, dropout=dropout)
    adapted = {name.partition(".")[0] for name in wrapped}
    in_frozen = [name for name in wrapped if name.partition(".")[0] in frozen]
    if in_frozen:
        part = in_frozen[0].partition(".")[0]
        raise ValueError(
            f"lora.targets {targets} match {in_frozen[0]} in the {part} part, which "
            f"train.freeze={list(frozen)} leaves out of training; match only the trained parts' "
            "layers (e.g. language_model.*_proj) or take the part out of train.freeze"
        )
    for part in COMPONENTS:
        if part not in adapted and part not in frozen:
            getattr(model, part).requires_grad_(True)
    return wrapped


@contextlib.contextmanager
def lora_bases(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with each :class:`LoRALinear` replaced by its base linear while inside (the
    same parameter objects under the plain model's names), for name-based loaders such as
    ``forge_models.load_hf_weights`` on a model adapted on the meta device; the adapters are
    put back on exit."""
    adapted = [
        (model.get_submodule(name.rpartition(".")[0]) if "." in name else model, name, m)
        for name, m in model.named_modules()
        if isinstance(m, LoRALinear)
    ]
    for parent, name, layer in adapted:
        setattr(parent, name.rpartition(".")[2], layer.base)
    try:
        yield model
    finally:
        for parent, name, layer in adapted:
            setattr(parent, name.rpartition(".")[2], layer)


#: The tensor-parallel styles of a linear layer that an adapted layer can take, in the
#: ``adapter:`` form (forge_parallel.tensor_parallel).
_ADAPTABLE_STYLES = ("colwise", "colwise_packed", "rowwise")


def lora_tp_plan(model: nn.Module, plan):
    """``plan`` (forge_parallel's ``TPPlan`` for ``model``) with its LoRA-adapted layers split
    with their adapters (:func:`lora_tp_styles`); ``plan`` itself for a model without
    adapters. ``ConfigError`` for an adapted layer whose style has no adapter form."""
    import dataclasses

    from forge_train.config import ConfigError

    if not any(isinstance(m, LoRALinear) for m in model.modules()):
        return plan
    try:
        styles = lora_tp_styles(model, dict(plan.styles))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return dataclasses.replace(plan, styles=styles)


def lora_tp_styles(model: nn.Module, styles: dict[str, object]) -> dict[str, object]:
    """``styles`` (a tensor-parallel plan's pattern -> style) for ``model`` after
    :func:`apply_lora`: a pattern whose matches are all :class:`LoRALinear` layers gets the
    ``adapter:`` form of its style; a pattern matching adapted and plain layers is split into
    one entry per module. A layer with another style (a vocabulary-parallel head) raises
    ``ValueError``: its adapters have no split. Styles of other modules are kept (a
    ``replicate`` block runs its adapted layers whole on every rank)."""
    from forge_parallel.tensor_parallel import match_modules

    out: dict[str, object] = {}
    for pattern, style in styles.items():
        matches = match_modules(model, pattern)
        adapted = [name for name, m in matches if isinstance(m, LoRALinear)]
        if not adapted:
            out[pattern] = style
            continue
        base = style.partition(":")[0] if isinstance(style, str) else None
        if base not in _ADAPTABLE_STYLES:
            raise ValueError(
                f"lora.targets: {adapted[0]} has the tensor-parallel style {style!r}, which "
                f"LoRA adapters cannot be split with (only {', '.join(_ADAPTABLE_STYLES)} "
                "layers: attention and MLP projections); leave it out of lora.targets or "
                "set parallel.tp=1"
            )
        if len(adapted) == len(matches):
            out[pattern] = f"adapter:{style}"
            continue
        for name, module in matches:
            out[name] = f"adapter:{style}" if isinstance(module, LoRALinear) else style
    return out


def merge_lora_state_dict(
    state: dict[str, torch.Tensor], *, scaling: float
) -> dict[str, torch.Tensor]:
    """A plain model's state dict from one with :class:`LoRALinear` entries:
    ``<name>.base.weight + scaling * <name>.lora_B @ <name>.lora_A`` becomes ``<name>.weight``."""
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(".lora_A") or key.endswith(".lora_B"):
            continue
        if ".base." in key:
            prefix, _, leaf = key.rpartition(".base.")
            if leaf == "weight":
                value = _merged(
                    value, state[f"{prefix}.lora_A"], state[f"{prefix}.lora_B"], scaling
                )
            key = f"{prefix}.{leaf}"
        merged[key] = value
    return merged


def _merged(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``W + scaling * B A``, computed in float32, in ``W``'s dtype."""
    return (weight.float() + (b.float() @ a.float()) * scaling).to(weight.dtype)


def merge_lora_tensors(
    items: Iterable[tuple[str, torch.Tensor]], *, scaling: float
) -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`merge_lora_state_dict` on a stream of ``(name, tensor)`` pairs, lazily: a
    layer's merged ``<name>.weight`` is yielded as soon as its base weight and both adapters
    have arrived (in a :class:`LoRALinear`'s state-dict order the adapters come first, so at
    the base weight's place); every other tensor passes through at once, renamed from
    ``<name>.base.<leaf>`` to ``<name>.<leaf>``. Raises ``ValueError`` naming the layer if the
    stream ends with a weight or an adapter whose partners never came."""
    waiting: dict[str, dict[str, torch.Tensor]] = {}  # layer -> its parts seen so far
    for key, value in items:
        for part in ("lora_A", "lora_B", "base.weight"):
            if key.endswith(f".{part}"):
                prefix = key[: -len(part) - 1]
                parts = waiting.setdefault(prefix, {})
                parts[part] = value
                if len(parts) == 3:
                    del waiting[prefix]
                    yield (
                        f"{prefix}.weight",
                        _merged(parts["base.weight"], parts["lora_A"], parts["lora_B"], scaling),
                    )
                break
        else:
            if ".base." in key:
                prefix, _, leaf = key.rpartition(".base.")
                key = f"{prefix}.{leaf}"
            yield key, value
    if waiting:
        incomplete = {prefix: sorted(parts) for prefix, parts in waiting.items()}
        raise ValueError(
            f"LoRA layers without their base weight or both adapters in the state: "
            f"{incomplete}; each needs <name>.base.weight, <name>.lora_A and <name>.lora_B"
        )
