"""SigLIP vision tower (transformers ``SiglipVisionModel``) and the LLaVA-OneVision projector
<-> forge's ``SiglipVisionEncoder`` / ``LlavaOnevisionProjector``.

SigLIP: Zhai et al. 2023, arXiv:2303.15343; LLaVA-OneVision: Li et al. 2024, arXiv:2408.03326.
A piece of a VLM mapping: the lead composes it with the language model's.

**Names.** Forge names are relative to the encoder (``patch_embed``, ``pos_embed``,
``blocks.{i}``, ``unapplied_blocks.{k}``, ``post_layernorm``) and, for the projector, carry its ``projector.`` prefix.
Checkpoint names of the **tower are relative to the vision tower** (a LLaVA-OneVision
checkpoint stores them under ``vision_tower.``; a standalone ``SiglipVisionModel`` under no
prefix); those of the **projector are relative to the checkpoint root**
(``multi_modal_projector.linear_{1,2}``, ``image_newline``). The tower comes in two layouts:
the Hub's (transformers 4.x, ``vision_model.encoder.layers.{i}...``) and the one transformers
5.x saves (``encoder.layers.{i}...``, no ``vision_model.`` level). Flag
``vision_model_prefix`` picks the first (the default, which both versions load); it is
detected from a checkpoint's names (:meth:`~forge_ckpt.mapping.MappingSpec.detect_context`).

**Context** (read from the vision sub-config, ``num_hidden_layers``; caller options):

- ``feature_layer`` (default ``-1``, the encoder config's): the hidden state the encoder
  outputs, as transformers' ``hidden_states`` index; ``None`` for the standalone tower's
  output with ``post_layernorm``. The encoder runs only the blocks it needs: the mapping
  derives ``num_layers`` (blocks run, ``blocks.{i}``). The checkpoint's later blocks (LLaVA's
  ``vision_feature_layer=-2`` leaves one) are mapped to ``unapplied_blocks.{k}``, which the
  encoder carries as buffers and never runs (transformers loads them and reads an inner
  hidden state), so a checkpoint round-trips bit for bit and its export loads with no
  missing weights. ``post_layernorm`` is always mapped: the encoder applies it only for
  ``feature_layer=None`` and otherwise carries it unapplied the same way. Pass
  ``feature_layer``, not ``num_layers``.
- ``carry_unapplied_layers`` (default True): False drops the later blocks on import
  (``ignored_hf_layers``) instead, for a target with no place for them (Megatron-Core's
  ``CLIPViTModel``, :mod:`forge_ckpt.megatron.vlm_families`).
- ``with_projector`` (default True: the LLaVA-OneVision vision part) and ``projector_bias``
  (the top-level ``multimodal_projector_bias``, default True). A standalone SigLIP:
  ``feature_layer=None, with_projector=False``.

The attention-pooling ``head`` of a ``SiglipVisionModel`` (``vision_use_head``) is not built
by forge (no VLM reads it): its tensors are dropped on import.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from forge_ckpt.mapping.spec import REQUIRED, MappingSpec, Rule

__all__ = [
    "BLOCK_NAMES",
    "CONTEXT_KEYS",
    "IGNORED_HF",
    "LAYOUT_PROBES",
    "MAPPING",
    "PROJECTOR_RULES",
    "derive_tower_context",
    "tower_rules",
]

#: One ViT block: forge name -> checkpoint name (below ``encoder.layers.{i}.``).
BLOCK_NAMES = (
    ("norm1.weight", "layer_norm1.weight"),
    ("norm1.bias", "layer_norm1.bias"),
    ("attn.q_proj.weight", "self_attn.q_proj.weight"),
    ("attn.q_proj.bias", "self_attn.q_proj.bias"),
    ("attn.k_proj.weight", "self_attn.k_proj.weight"),
    ("attn.k_proj.bias", "self_attn.k_proj.bias"),
    ("attn.v_proj.weight", "self_attn.v_proj.weight"),
    ("attn.v_proj.bias", "self_attn.v_proj.bias"),
    ("attn.out_proj.weight", "self_attn.out_proj.weight"),
    ("attn.out_proj.bias", "self_attn.out_proj.bias"),
    ("norm2.weight", "layer_norm2.weight"),
    ("norm2.bias", "layer_norm2.bias"),
    ("mlp.fc1.weight", "mlp.fc1.weight"),
    ("mlp.fc1.bias", "mlp.fc1.bias"),
    ("mlp.fc2.weight", "mlp.fc2.weight"),
    ("mlp.fc2.bias", "mlp.fc2.bias"),
)

#: The two tower layouts: (checkpoint prefix, the flag that selects it).
_LAYOUTS = (("vision_model.", "vision_model_prefix"), ("", "!vision_model_prefix"))

_HEAD = (
    "head.probe",
    "head.attention.in_proj_weight",
    "head.attention.in_proj_bias",
    "head.attention.out_proj.weight",
    "head.attention.out_proj.bias",
    "head.layernorm.weight",
    "head.layernorm.bias",
    "head.mlp.fc1.weight",
    "head.mlp.fc1.bias",
    "head.mlp.fc2.weight",
    "head.mlp.fc2.bias",
)


def tower_rules() -> tuple[Rule, ...]:
    """The rules of a SigLIP-style tower (SigLIP's Conv2d or SigLIP 2's Linear patch
    embedding: same names), in both layouts.

    The ``unapplied_blocks.{k}`` rules map the checkpoint blocks after those the encoder
    runs (``num_hf_layers``), or list them as ``ignored_hf_layers`` (dropped) when the
    context does not carry them.
    """
    globals_, layers, post = [], [], []
    for prefix, when in _LAYOUTS:
        emb = f"{prefix}embeddings"
        globals_ += [
            Rule("patch_embed.weight", f"{emb}.patch_embedding.weight", when=when),
            Rule("patch_embed.bias", f"{emb}.patch_embedding.bias", when=when),
            Rule("pos_embed.weight", f"{emb}.position_embedding.weight", when=when),
        ]
        layer = f"{prefix}encoder.layers.{{i}}"
        layers += [Rule(f"blocks.{{i}}.{f}", f"{layer}.{h}", when=when) for f, h in BLOCK_NAMES]
        layers += [
            Rule(f"unapplied_blocks.{{k}}.{f}", f"{layer}.{h}", when=when) for f, h in BLOCK_NAMES
        ]
        post += [
            Rule(f"post_layernorm.{t}", f"{prefix}post_layernorm.{t}", when=when)
            for t in ("weight", "bias")
        ]
    return (*globals_, *layers, *post)


#: Projector rules (checkpoint names relative to the checkpoint root).
PROJECTOR_RULES = (
    Rule(
        "projector.linear_1.weight", "multi_modal_projector.linear_1.weight", when="with_projector"
    ),
    Rule(
        "projector.linear_1.bias",
        "multi_modal_projector.linear_1.bias",
        when=("with_projector", "projector_bias"),
    ),
    Rule(
        "projector.linear_2.weight", "multi_modal_projector.linear_2.weight", when="with_projector"
    ),
    Rule(
        "projector.linear_2.bias",
        "multi_modal_projector.linear_2.bias",
        when=("with_projector", "projector_bias"),
    ),
    Rule("projector.image_newline", "image_newline", when="with_projector"),
)

#: Dropped on import: the pooling head (never built).
IGNORED_HF = tuple((f"{prefix}{name}", None) for prefix, _ in _LAYOUTS for name in _HEAD)

#: A checkpoint in the Hub (transformers 4.x) layout.
LAYOUT_PROBES = (("vision_model_prefix", "vision_model.embeddings.patch_embedding.weight"),)

CONTEXT_KEYS = {"num_layers": ("num_hidden_layers", REQUIRED)}


def derive_tower_context(ctx: Mapping[str, Any]) -> dict[str, Any]:
    """Blocks run for ``feature_layer``, and the later checkpoint blocks carried unapplied
    (``num_hf_layers``) or dropped (``ignored_hf_layers``, with ``carry_unapplied_layers``
    False); see the module docstring."""
    total = int(ctx["num_layers"])
    feature_layer = ctx.get("feature_layer", -1)
    if feature_layer is None:
        depth = total
    elif not -(total + 1) <= int(feature_layer) <= total:
        raise ValueError(
            f"feature_layer={feature_layer} is out of range for a {total}-layer tower: use "
            f"-{total + 1}..{total} (a hidden_states index) or None"
        )
    else:
        depth = int(feature_layer) % (total + 1)
    carry = bool(ctx.get("carry_unapplied_layers", True))
    return {
        "feature_layer": feature_layer,
        "num_layers": depth,
        "carry_unapplied_layers": carry,
        "num_hf_layers": total if carry else depth,
        "ignored_hf_layers": frozenset() if carry else frozenset(range(depth, total)),
        "vision_model_prefix": ctx.get("vision_model_prefix", True),
    }


def _derive(ctx: Mapping[str, Any]) -> dict[str, Any]:
    return {
        **derive_tower_context(ctx),
        "with_projector": ctx.get("with_projector", True),
        "projector_bias": ctx.get("projector_bias", True),
    }


MAPPING = MappingSpec(
    name="siglip_vision",
    hf_model_types=("siglip_vision_model",),
    rules=tower_rules() + PROJECTOR_RULES,
    context_keys=CONTEXT_KEYS,
    ignored_hf=IGNORED_HF,
    derive=_derive,
    layout_probes=LAYOUT_PROBES,
    description="SigLIP vision tower (SiglipVisionModel) + LLaVA-OneVision projector",
)
