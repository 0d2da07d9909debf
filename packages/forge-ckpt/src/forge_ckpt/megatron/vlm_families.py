"""Hugging Face <-> Megatron-Core ``LLaVAModel`` mappings of the vision-language families.

Megatron-Core's ``LLaVAModel`` (``megatron/core/models/multimodal/llava_model.py``; LLaVA: Liu et
al. 2023, arXiv:2304.08485) holds three modules: ``vision_model`` (a ``CLIPViTModel``, subtypes
``siglip`` and ``internvit``), ``vision_projection`` (a ``MultimodalProjector``: a two-layer GELU
MLP, ``encoder.linear_fc1`` / ``encoder.linear_fc2``) and ``language_model`` (a ``GPTModel``).
The language model maps as its text family does (:mod:`~forge_ckpt.megatron.families`), under
``language_model.``. The vision encoder and projector live on the first pipeline stage (where
Megatron-Core builds them, ``add_encoder``), unsplit by the pipeline; tensor parallelism splits
their layers as the language model's, with a plain column-parallel ``linear_fc1`` (GELU, not
SwiGLU). Names and QKV layouts follow Megatron-LM's ``examples/multimodal/model_converter``
(``siglip_converter.py``, ``internvit_converter.py``): ``linear_qkv`` holds ``[q_h; k_h; v_h]`` head
by head (:class:`~forge_ckpt.mapping.spec.GroupedQKV` with one group per head)::

    vision_model.conv1.{weight,bias}                 <- patch embedding (Conv2d)
    vision_model.position_embeddings.weight          <- position embedding ([n, h])
    vision_model.class_token                         <- InternViT's cls_token
    vision_model.decoder.layers.{i}.self_attention.linear_qkv.{weight,bias}  <- q/k/v  [GroupedQKV]
    vision_model.decoder.layers.{i}.self_attention.linear_proj.{weight,bias} <- out projection
    vision_model.decoder.layers.{i}.mlp.linear_fc{1,2}.{weight,bias}         <- fc1 / fc2
    vision_model.decoder.layers.{i}.ls{1,2}          <- InternViT's layer scales (lambda_1/2)
    vision_model.ln_post.{weight,bias}               <- SigLIP's post_layernorm
    vision_projection.encoder.linear_fc{1,2}.{weight,bias}  <- multi_modal_projector.linear_{1,2}

**LLaVA-OneVision** (SigLIP + 2-layer MLP + Qwen2; Li et al. 2024, arXiv:2408.03326): SigLIP's
layer norms are fused into ``linear_qkv`` / ``linear_fc1`` (``layer_norm_{weight,bias}``) in the
Transformer Engine spec (Megatron-LM's ``get_layer_spec_te(is_vit=True)``) and are
``input_layernorm`` / ``pre_mlp_layernorm`` in the local spec. Two gaps of Megatron-Core, not of
the mapping: ``LLaVAModel`` has no ``image_newline`` (AnyRes's row separator), which is kept as
the extra tensor ``vision_projection.image_newline`` (a strict ``load_state_dict`` must drop
it), and ``CLIPViTModel(siglip)`` applies ``ln_post`` to its output where LLaVA-OneVision
(``vision_feature_layer=-1``) takes the last block's output without it.

**InternVL** (InternViT + pixel-shuffle projector + Qwen2/Llama; arXiv:2312.14238,
arXiv:2412.05271): Megatron-LM's InternViT layer specs (``examples/multimodal/nvlm/internvit.py``:
``get_internvit300M_layer_spec`` for the LayerNorm towers of the InternVL 2.5 / 3 ``-hf`` models,
``get_internvit_layer_spec`` for InternViT-6B's RMSNorm and per-head q/k norms; both a
``LayerScalingTransformerLayer``) keep separate ``input_layernorm`` / ``pre_mlp_layernorm`` in
both specs and add ``ls1`` / ``ls2``; the projector's LayerNorm exists only in the Transformer
Engine projector spec (``get_norm_mlp_module_spec_te``: ``linear_fc1.layer_norm_{weight,bias}``).
The pixel shuffle (``llava_model.pixel_shuffle``, version 2) is InternVL's and the class token is
dropped (``drop_vision_class_token``), as transformers does.

**Vision layers after** ``vision_feature_layer`` (LLaVA's ``-2``; InternVL's root key, with
InternViT's final ``layernorm`` then unapplied): transformers loads them but reads an inner
hidden state, and forge carries them unapplied (``carry_unapplied_layers``). Megatron-Core's
``CLIPViTModel`` returns its last layer's output and has no place for layers it does not run,
so these mappings build it with the layers the features need (``vision_num_layers``) and drop
the later ones on import (``ignored_hf_layers``): HF -> Megatron -> HF then gives the tower
without them, the one tensor set a Megatron checkpoint of this model can hold.

**Qwen2.5-VL** has no Megatron-Core counterpart: ``CLIPViTModel`` and ``RADIOViTModel`` have
learned absolute position embeddings and full attention, while Qwen2.5-VL's vision tower uses 2-D
rotary embeddings, windowed attention in most blocks, a 3-D (temporal) patch embedding and a 2x2
patch merger; :func:`get_megatron_family` refuses it with that explanation
(:data:`UNSUPPORTED_VLM`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from forge_ckpt.mapping.composed import ComposedMapping
from forge_ckpt.mapping.families import intern_vit_vision, internvl, llava_onevision, siglip_vision
from forge_ckpt.mapping.spec import REQUIRED, GroupedQKV, MappingSpec, Rule, TensorTransform

__all__ = ["UNSUPPORTED_VLM", "VLM_TEXT_FAMILIES", "build_vlm_mappings", "vision_args"]

#: Model types with no Megatron-Core module to hold them -> why (the refusal's text).
UNSUPPORTED_VLM = {
    "qwen2_5_vl": (
        "Megatron-Core has no module for Qwen2.5-VL's vision tower: its LLaVAModel encoders "
        "(CLIPViTModel, RADIOViTModel) use learned absolute position embeddings and full "
        "attention, while Qwen2.5-VL's uses 2-D rotary position embeddings, windowed attention, "
        "a 3-D (temporal) patch embedding and a 2x2 patch merger. Keep it in the Hugging Face "
        "or forge format (forge-convert hf-to-forge)"
    ),
}

#: The language models a LLaVAModel mapping takes, by ``text_config.model_type``.
VLM_TEXT_FAMILIES = tuple(llava_onevision.TEXT_SPECS)

_V = "vision_model.decoder.layers.{i}"
_HEAD_QKV = GroupedQKV(heads="num_attention_heads", groups="num_attention_heads")


@dataclass(frozen=True)
class SqueezeLeading(TensorTransform):
    """The checkpoint's leading axis of size 1 dropped (InternViT's ``[1, n, h]`` position
    embeddings are Megatron's ``nn.Embedding`` weight ``[n, h]``)."""

    def to_forge(self, t: torch.Tensor, ctx: Mapping[str, Any]) -> torch.Tensor:
        if t.dim() < 1 or t.shape[0] != 1:
            raise ValueError(f"expected a leading axis of size 1, got shape {tuple(t.shape)}")
        return t[0]

    def to_hf(self, t: torch.Tensor, ctx: Mapping[str, Any]) -> torch.Tensor:
        return t.unsqueeze(0)

    def forge_shape(self, shape, ctx):
        return tuple(shape[1:])

    def describe(self) -> str:
        return "squeeze(0)"


def _extra_layer(rule: Rule) -> Rule:
    """``rule`` for a checkpoint layer after those the encoder builds: bound only to list the
    tensors of ``ignored_hf_layers`` (dropped on import: see the module docstring)."""
    forge = rule.forge.replace(_V, "vision_model.unbuilt_layers.{k}")
    return Rule(forge, rule.hf, rule.concat, rule.transforms, rule.when)


def _head_dim(ctx: Mapping[str, Any]) -> dict[str, Any]:
    heads, hidden = int(ctx["num_attention_heads"]), int(ctx["hidden_size"])
    if hidden % heads:
        raise ValueError(f"vision hidden_size {hidden} is not a multiple of {heads} heads")
    return {"head_dim": hidden // heads, "te_spec": ctx.get("te_spec", True)}


# --------------------------------------------------------------------------------------------
# SigLIP (CLIPViTModel, subtype "siglip") and LLaVA-OneVision's projector
# --------------------------------------------------------------------------------------------


def _siglip_rules() -> tuple[Rule, ...]:
    """The SigLIP tower in both checkpoint layouts (``vision_model_prefix``), then the projector."""
    globals_, layers, post = [], [], []
    for prefix, layout in (("vision_model.", "vision_model_prefix"), ("", "!vision_model_prefix")):
        emb, h = f"{prefix}embeddings", f"{prefix}encoder.layers.{{i}}"
        globals_ += [
            Rule("vision_model.conv1.weight", f"{emb}.patch_embedding.weight", when=layout),
            Rule("vision_model.conv1.bias", f"{emb}.patch_embedding.bias", when=layout),
            Rule("vision_model.position_embeddings.weight", f"{emb}.position_embedding.weight", when=layout),
        ]  # fmt: skip
        for t in ("weight", "bias"):
            layers += [
                Rule(f"{_V}.self_attention.linear_qkv.layer_norm_{t}", f"{h}.layer_norm1.{t}", when=(layout, "te_spec")),
                Rule(f"{_V}.input_layernorm.{t}", f"{h}.layer_norm1.{t}", when=(layout, "!te_spec")),
                Rule(f"{_V}.self_attention.linear_qkv.{t}", tuple(f"{h}.self_attn.{p}_proj.{t}" for p in "qkv"), _HEAD_QKV, when=layout),
                Rule(f"{_V}.self_attention.linear_proj.{t}", f"{h}.self_attn.out_proj.{t}", when=layout),
                Rule(f"{_V}.mlp.linear_fc1.layer_norm_{t}", f"{h}.layer_norm2.{t}", when=(layout, "te_spec")),
                Rule(f"{_V}.pre_mlp_layernorm.{t}", f"{h}.layer_norm2.{t}", when=(layout, "!te_spec")),
                Rule(f"{_V}.mlp.linear_fc1.{t}", f"{h}.mlp.fc1.{t}", when=layout),
                Rule(f"{_V}.mlp.linear_fc2.{t}", f"{h}.mlp.fc2.{t}", when=layout),
            ]  # fmt: skip
            post.append(
                Rule(f"vision_model.ln_post.{t}", f"{prefix}post_layernorm.{t}", when=layout)
            )
    p = "multi_modal_projector"
    projector = (
        Rule("vision_projection.encoder.linear_fc1.weight", f"{p}.linear_1.weight"),
        Rule("vision_projection.encoder.linear_fc1.bias", f"{p}.linear_1.bias", when="projector_bias"),
        Rule("vision_projection.encoder.linear_fc2.weight", f"{p}.linear_2.weight"),
        Rule("vision_projection.encoder.linear_fc2.bias", f"{p}.linear_2.bias", when="projector_bias"),
        Rule("vision_projection.image_newline", "image_newline"),
    )  # fmt: skip
    return (*globals_, *layers, *(_extra_layer(r) for r in layers), *post, *projector)


def _siglip_derive(ctx: Mapping[str, Any]) -> dict[str, Any]:
    return {
        **siglip_vision.derive_tower_context({**ctx, "carry_unapplied_layers": False}),
        **_head_dim(ctx),
        "projector_bias": ctx.get("projector_bias", True),
    }


SIGLIP_MEGATRON = MappingSpec(
    name="megatron-siglip_vision",
    hf_model_types=("siglip_vision_model",),
    rules=_siglip_rules(),
    context_keys={
        **siglip_vision.CONTEXT_KEYS,
        "num_attention_heads": ("num_attention_heads", REQUIRED),
        "hidden_size": ("hidden_size", REQUIRED),
    },
    ignored_hf=siglip_vision.IGNORED_HF,
    derive=_siglip_derive,
    layout_probes=siglip_vision.LAYOUT_PROBES,
    description="SigLIP tower + LLaVA-OneVision projector <-> Megatron-Core CLIPViTModel(siglip)",
)


# --------------------------------------------------------------------------------------------
# InternViT (CLIPViTModel, subtype "internvit") and InternVL's pixel-shuffle projector
# --------------------------------------------------------------------------------------------


def _internvit_rules() -> tuple[Rule, ...]:
    h, p = "encoder.layer.{i}", "multi_modal_projector"
    layers = [
        Rule(f"{_V}.input_layernorm.weight", f"{h}.layernorm_before.weight"),
        Rule(f"{_V}.input_layernorm.bias", f"{h}.layernorm_before.bias", when="layer_norm"),
        Rule(f"{_V}.self_attention.linear_qkv.weight", tuple(f"{h}.attention.{q}_proj.weight" for q in "qkv"), _HEAD_QKV),
        Rule(f"{_V}.self_attention.linear_qkv.bias", tuple(f"{h}.attention.{q}_proj.bias" for q in "qkv"), _HEAD_QKV, when="attention_bias"),
        Rule(f"{_V}.self_attention.q_layernorm.weight", f"{h}.attention.q_norm.weight", when="use_qk_norm"),
        Rule(f"{_V}.self_attention.k_layernorm.weight", f"{h}.attention.k_norm.weight", when="use_qk_norm"),
        Rule(f"{_V}.self_attention.linear_proj.weight", f"{h}.attention.projection_layer.weight"),
        Rule(f"{_V}.self_attention.linear_proj.bias", f"{h}.attention.projection_layer.bias"),
        Rule(f"{_V}.ls1", f"{h}.lambda_1"),
        Rule(f"{_V}.pre_mlp_layernorm.weight", f"{h}.layernorm_after.weight"),
        Rule(f"{_V}.pre_mlp_layernorm.bias", f"{h}.layernorm_after.bias", when="layer_norm"),
        Rule(f"{_V}.mlp.linear_fc1.weight", f"{h}.mlp.fc1.weight"),
        Rule(f"{_V}.mlp.linear_fc1.bias", f"{h}.mlp.fc1.bias"),
        Rule(f"{_V}.mlp.linear_fc2.weight", f"{h}.mlp.fc2.weight"),
        Rule(f"{_V}.mlp.linear_fc2.bias", f"{h}.mlp.fc2.bias"),
        Rule(f"{_V}.ls2", f"{h}.lambda_2"),
    ]  # fmt: skip
    f1 = "vision_projection.encoder.linear_fc1"
    return (
        Rule("vision_model.class_token", "embeddings.cls_token"),
        Rule("vision_model.conv1.weight", "embeddings.patch_embeddings.projection.weight"),
        Rule("vision_model.conv1.bias", "embeddings.patch_embeddings.projection.bias"),
        Rule("vision_model.position_embeddings.weight", "embeddings.position_embeddings", transforms=(SqueezeLeading(),)),
        *layers,
        *(_extra_layer(r) for r in layers),
        Rule(f"{f1}.layer_norm_weight", f"{p}.layer_norm.weight"),
        Rule(f"{f1}.layer_norm_bias", f"{p}.layer_norm.bias"),
        Rule(f"{f1}.weight", f"{p}.linear_1.weight"),
        Rule(f"{f1}.bias", f"{p}.linear_1.bias"),
        Rule("vision_projection.encoder.linear_fc2.weight", f"{p}.linear_2.weight"),
        Rule("vision_projection.encoder.linear_fc2.bias", f"{p}.linear_2.bias"),
    )  # fmt: skip


def _internvit_derive(ctx: Mapping[str, Any]) -> dict[str, Any]:
    """InternViT's derived context (layers built for ``feature_layer``), refusing what
    Megatron-Core's ``CLIPViTModel(internvit)`` cannot hold."""
    out = {
        **intern_vit_vision.MAPPING.derive({**ctx, "carry_unapplied_layers": False}),
        **_head_dim(ctx),
    }
    if not ctx["use_absolute_position_embeddings"]:
        raise ValueError(
            "this InternViT has no absolute position embeddings; Megatron-Core's "
            "CLIPViTModel(internvit) always adds them, so it cannot hold this tower"
        )
    if out["post_norm"]:
        raise ValueError(
            "this InternViT applies a final layernorm (use_mean_pooling=false, "
            "vision_feature_layer=-1); Megatron-Core's CLIPViTModel(internvit) has none"
        )
    if not out["te_spec"]:
        raise ValueError(
            "InternVL's projector LayerNorm exists only in Megatron-LM's Transformer Engine "
            "projector spec (linear_fc1.layer_norm_weight); convert with te_spec=True "
            "(forge-convert: drop --local-spec)"
        )
    return out


INTERNVIT_MEGATRON = MappingSpec(
    name="megatron-intern_vit_vision",
    hf_model_types=("internvl_vision",),
    rules=_internvit_rules(),
    context_keys={
        **intern_vit_vision.CONTEXT_KEYS,
        "num_attention_heads": ("num_attention_heads", REQUIRED),
        "hidden_size": ("hidden_size", REQUIRED),
    },
    ignored_hf=intern_vit_vision.MAPPING.ignored_hf,
    derive=_internvit_derive,
    description="InternViT + InternVL projector <-> Megatron-Core CLIPViTModel(internvit)",
)


# --------------------------------------------------------------------------------------------
# The LLaVAModel mappings
# --------------------------------------------------------------------------------------------


def _llava(base: ComposedMapping, vision: MappingSpec, text: Mapping[str, MappingSpec]):
    """``base``'s parts (config views, checkpoint prefixes) with Megatron names: the vision
    part's full ``vision_model.`` / ``vision_projection.`` names, the language model's under
    ``language_model.``."""
    vision_part, text_part = base.parts
    return dataclasses.replace(
        base,
        name=f"megatron-{base.name}",
        parts=(
            dataclasses.replace(vision_part, spec={next(iter(vision_part.spec)): vision}, forge_prefix=""),
            dataclasses.replace(text_part, spec=dict(text), forge_prefix="language_model."),
        ),
        description=f"{base.description} <-> Megatron-Core LLaVAModel",
    )  # fmt: skip


def build_vlm_mappings(text: Mapping[str, MappingSpec]) -> dict[str, ComposedMapping]:
    """Family name -> its ``LLaVAModel`` mapping; ``text``: the Megatron text mappings by
    ``model_type`` (those of :data:`VLM_TEXT_FAMILIES`)."""
    return {
        "llava_onevision": _llava(llava_onevision.MAPPING, SIGLIP_MEGATRON, text),
        "internvl": _llava(internvl.MAPPING, INTERNVIT_MEGATRON, text),
    }


def vision_args(family: str, config: Mapping[str, Any], ctx: Mapping[str, Any]) -> dict:
    """The Megatron-LM arguments that describe a VLM's encoder (``examples/multimodal``'s
    ``--vision-model-type``, ``--pixel-shuffle``, ``--disable-vision-class-token``) and its size."""
    vision = ctx["parts"]["vision"]
    if family == "llava_onevision":
        model_type = "siglip"
    else:  # Megatron-LM's InternViT-300M spec (LayerNorm) or InternViT-6B spec (RMSNorm)
        model_type = "internvit300M" if vision["layer_norm"] else "internvit"
    return {
        "vision_model_type": model_type,
        "vision_num_layers": int(vision["num_layers"]),
        "vision_hidden_size": int(vision["hidden_size"]),
        "vision_num_attention_heads": int(vision["num_attention_heads"]),
        "pixel_shuffle": family == "internvl",
        "disable_vision_class_token": family == "internvl",
    }
