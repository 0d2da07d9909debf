"""InternViT (transformers ``InternVLVisionModel``) and InternVL's pixel-shuffle projector <-> forge.

Papers: InternVL, arXiv:2312.14238; InternVL 2.5, arXiv:2412.05271. The forge side is
``forge_models.vision.intern_vit.InternVisionEncoder`` (names relative to the encoder) and
``forge_models.vision.pixel_shuffle_projector.PixelShuffleProjector`` (prefix ``projector.``).

Checkpoint names: the vision tower's are relative to the tower (an InternVL checkpoint stores
them under ``vision_tower.``, transformers 5.x modules under ``model.vision_tower.``); the
projector's are ``multi_modal_projector.*``, relative to the checkpoint root (transformers 5.x
modules: ``model.multi_modal_projector.*``). The VLM mapping adds the prefixes. ::

    patch_embed.{weight,bias}         <- embeddings.patch_embeddings.projection.{weight,bias}
    cls_token                         <- embeddings.cls_token
    pos_embed                         <- embeddings.position_embeddings
    blocks.{i}.norm1 / norm2          <- encoder.layer.{i}.layernorm_before / layernorm_after
    blocks.{i}.attn.{q,k,v}_proj      <- encoder.layer.{i}.attention.{q,k,v}_proj
    blocks.{i}.attn.{q,k}_norm        <- encoder.layer.{i}.attention.{q,k}_norm
    blocks.{i}.attn.o_proj            <- encoder.layer.{i}.attention.projection_layer
    blocks.{i}.ls1 / ls2              <- encoder.layer.{i}.lambda_1 / lambda_2
    blocks.{i}.mlp.fc1 / fc2          <- encoder.layer.{i}.mlp.fc1 / fc2
    unapplied_blocks.{k}. ...         <- encoder.layer.{i}. ...     (i >= the layers run)
    post_norm                         <- layernorm                  (use_mean_pooling=false)
    projector.norm / fc1 / fc2        <- multi_modal_projector.layer_norm / linear_1 / linear_2

Context (from the ``vision_config`` dict): ``num_hidden_layers``, ``norm_type``,
``attention_bias``, ``use_qk_norm``, ``use_absolute_position_embeddings``,
``use_mean_pooling``; options ``feature_layer`` (InternVL's top-level
``vision_feature_layer``, default -1) and ``projector`` (default True; False for a bare
``InternVLVisionModel``). The encoder runs only the layers ``feature_layer`` needs; the
checkpoint layers after them map to ``unapplied_blocks.{k}`` and the final ``layernorm`` (when
``feature_layer != -1``) to ``post_norm``, both carried as buffers and never run (transformers
loads them and reads an inner hidden state), so a checkpoint round-trips bit for bit. Option
``carry_unapplied_layers=False`` drops them on import instead (``ignored_hf_layers``, flag
``unused_post_norm``), for a target with no place for them (Megatron-Core's ``CLIPViTModel``).
``embeddings.mask_token`` (masked image modeling) is always dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from forge_ckpt.mapping.spec import REQUIRED, MappingSpec, Rule

__all__ = ["CONTEXT_KEYS", "LAYER_RULES", "MAPPING", "PROJECTOR_RULES", "TOWER_RULES"]

_L = "encoder.layer.{i}"

EMBEDDING_RULES = (
    Rule("patch_embed.weight", "embeddings.patch_embeddings.projection.weight"),
    Rule("patch_embed.bias", "embeddings.patch_embeddings.projection.bias"),
    Rule("cls_token", "embeddings.cls_token"),
    Rule("pos_embed", "embeddings.position_embeddings", when="use_absolute_position_embeddings"),
)

#: One InternViT block.
LAYER_RULES = (
    Rule("blocks.{i}.norm1.weight", f"{_L}.layernorm_before.weight"),
    Rule("blocks.{i}.norm1.bias", f"{_L}.layernorm_before.bias", when="layer_norm"),
    *(
        Rule(f"blocks.{{i}}.attn.{p}_proj.{t}", f"{_L}.attention.{p}_proj.{t}", when=when)
        for p in "qkv"
        for t, when in (("weight", None), ("bias", "attention_bias"))
    ),
    Rule("blocks.{i}.attn.q_norm.weight", f"{_L}.attention.q_norm.weight", when="use_qk_norm"),
    Rule("blocks.{i}.attn.k_norm.weight", f"{_L}.attention.k_norm.weight", when="use_qk_norm"),
    Rule("blocks.{i}.attn.o_proj.weight", f"{_L}.attention.projection_layer.weight"),
    Rule("blocks.{i}.attn.o_proj.bias", f"{_L}.attention.projection_layer.bias"),
    Rule("blocks.{i}.ls1", f"{_L}.lambda_1"),
    Rule("blocks.{i}.norm2.weight", f"{_L}.layernorm_after.weight"),
    Rule("blocks.{i}.norm2.bias", f"{_L}.layernorm_after.bias", when="layer_norm"),
    Rule("blocks.{i}.mlp.fc1.weight", f"{_L}.mlp.fc1.weight"),
    Rule("blocks.{i}.mlp.fc1.bias", f"{_L}.mlp.fc1.bias"),
    Rule("blocks.{i}.mlp.fc2.weight", f"{_L}.mlp.fc2.weight"),
    Rule("blocks.{i}.mlp.fc2.bias", f"{_L}.mlp.fc2.bias"),
    Rule("blocks.{i}.ls2", f"{_L}.lambda_2"),
)


def _unapplied(rule: Rule) -> Rule:
    """``rule`` for a checkpoint layer after those the encoder runs (``{k}``: mapped to the
    encoder's ``unapplied_blocks``, or listed as ``ignored_hf_layers`` when not carried)."""
    return Rule(rule.forge.replace("blocks.{i}", "unapplied_blocks.{k}"), rule.hf, when=rule.when)


#: ``carries_post_norm``: applied (``post_norm``) or carried unapplied.
POST_NORM_RULES = (
    Rule("post_norm.weight", "layernorm.weight", when="carries_post_norm"),
    Rule("post_norm.bias", "layernorm.bias", when="carries_post_norm"),
)

TOWER_RULES = EMBEDDING_RULES + LAYER_RULES + POST_NORM_RULES

_P = "multi_modal_projector"

PROJECTOR_RULES = (
    Rule("projector.norm.weight", f"{_P}.layer_norm.weight", when="projector"),
    Rule("projector.norm.bias", f"{_P}.layer_norm.bias", when="projector"),
    Rule("projector.fc1.weight", f"{_P}.linear_1.weight", when="projector"),
    Rule("projector.fc1.bias", f"{_P}.linear_1.bias", when="projector"),
    Rule("projector.fc2.weight", f"{_P}.linear_2.weight", when="projector"),
    Rule("projector.fc2.bias", f"{_P}.linear_2.bias", when="projector"),
)

#: Context read from the vision config: key -> (config key, default).
CONTEXT_KEYS = {
    "num_layers": ("num_hidden_layers", REQUIRED),
    "num_checkpoint_layers": ("num_hidden_layers", REQUIRED),
    "norm_type": ("norm_type", "layer_norm"),
    "attention_bias": ("attention_bias", False),
    "use_qk_norm": ("use_qk_norm", False),
    "use_absolute_position_embeddings": ("use_absolute_position_embeddings", True),
    "use_mean_pooling": ("use_mean_pooling", True),
    "feature_layer": ("vision_feature_layer", -1),
}


def _derive(ctx: Mapping[str, Any]) -> dict[str, Any]:
    """The layers the encoder runs for ``feature_layer`` (as ``InternVisionConfig``), the
    later checkpoint layers (carried or dropped, see ``carry_unapplied_layers``), and the flags
    of the optional parts."""
    total, feature = int(ctx["num_checkpoint_layers"]), int(ctx["feature_layer"])
    if not -(total + 1) <= feature <= total:
        raise ValueError(
            f"feature_layer {feature} is out of range for {total} layers: use "
            f"-{total + 1}..{total} (0 = the embeddings, -1 = the last layer)"
        )
    if ctx["norm_type"] not in ("layer_norm", "rms_norm"):
        raise ValueError(f"norm_type must be 'layer_norm' or 'rms_norm', got {ctx['norm_type']!r}")
    built = feature if feature >= 0 else total + 1 + feature
    has_post_norm = not ctx["use_mean_pooling"]
    carry = bool(ctx.get("carry_unapplied_layers", True))
    return {
        "num_layers": built,
        "carry_unapplied_layers": carry,
        "num_hf_layers": total if carry else built,
        "ignored_hf_layers": frozenset() if carry else frozenset(range(built, total)),
        "layer_norm": ctx["norm_type"] == "layer_norm",
        "post_norm": has_post_norm and feature == -1,  # applied
        "carries_post_norm": has_post_norm and (feature == -1 or carry),
        "unused_post_norm": has_post_norm and feature != -1 and not carry,  # dropped
        "projector": bool(ctx.get("projector", True)),
    }


MAPPING = MappingSpec(
    name="intern_vit_vision",
    hf_model_types=("internvl_vision",),
    rules=TOWER_RULES + tuple(_unapplied(r) for r in LAYER_RULES) + PROJECTOR_RULES,
    context_keys=CONTEXT_KEYS,
    ignored_hf=(
        ("embeddings.mask_token", None),
        ("layernorm.weight", "unused_post_norm"),
        ("layernorm.bias", "unused_post_norm"),
    ),
    derive=_derive,
    description="InternViT vision tower + InternVL pixel-shuffle projector (InternVL 2.5 / 3)",
)
