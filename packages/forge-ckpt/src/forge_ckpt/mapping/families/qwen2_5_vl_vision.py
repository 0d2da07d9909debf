"""Qwen2.5-VL vision tower + patch merger (transformers ``Qwen2_5_VisionTransformerPretrainedModel``)
<-> forge's ``Qwen2_5VisionEncoder`` and ``Qwen2_5VLPatchMerger``.

Qwen2.5-VL Technical Report (Bai et al. 2025, arXiv:2502.13923). Checkpoint names are relative
to the vision tower (``model.visual.`` / ``visual.`` in a whole-model checkpoint):
``patch_embed.proj`` (Conv3d, kept in its shape), ``blocks.{i}.norm1/norm2``,
``blocks.{i}.attn.qkv/proj``, ``blocks.{i}.mlp.{gate,up,down}_proj`` (all with biases),
``merger.ln_q`` and ``merger.mlp.{0,2}``. Forge names are relative to the encoder
(``blocks.{i}...``) and, under ``projector.``, to the merger; forge fuses gate and up into one
``gate_up_proj`` (gate rows first, weights and biases alike). ``num_layers`` is the vision
config's ``depth``. A whole-VLM mapping composes this with a language-model mapping by adding
the prefixes.
"""

from __future__ import annotations

from forge_ckpt.mapping.spec import REQUIRED, Concat, MappingSpec, Rule

__all__ = ["ENCODER_RULES", "MAPPING", "PROJECTOR_RULES"]

_B = "blocks.{i}"

ENCODER_RULES = (
    Rule("patch_embed.weight", "patch_embed.proj.weight"),
    Rule(f"{_B}.attn_norm.weight", f"{_B}.norm1.weight"),
    Rule(f"{_B}.attn.qkv_proj.weight", f"{_B}.attn.qkv.weight"),
    Rule(f"{_B}.attn.qkv_proj.bias", f"{_B}.attn.qkv.bias"),
    Rule(f"{_B}.attn.o_proj.weight", f"{_B}.attn.proj.weight"),
    Rule(f"{_B}.attn.o_proj.bias", f"{_B}.attn.proj.bias"),
    Rule(f"{_B}.mlp_norm.weight", f"{_B}.norm2.weight"),
    *(
        Rule(
            f"{_B}.mlp.gate_up_proj.{p}",
            (f"{_B}.mlp.gate_proj.{p}", f"{_B}.mlp.up_proj.{p}"),
            concat=Concat(dim=0),
        )
        for p in ("weight", "bias")
    ),
    Rule(f"{_B}.mlp.down_proj.weight", f"{_B}.mlp.down_proj.weight"),
    Rule(f"{_B}.mlp.down_proj.bias", f"{_B}.mlp.down_proj.bias"),
)

PROJECTOR_RULES = (
    Rule("projector.norm.weight", "merger.ln_q.weight"),
    Rule("projector.fc1.weight", "merger.mlp.0.weight"),
    Rule("projector.fc1.bias", "merger.mlp.0.bias"),
    Rule("projector.fc2.weight", "merger.mlp.2.weight"),
    Rule("projector.fc2.bias", "merger.mlp.2.bias"),
)

MAPPING = MappingSpec(
    name="qwen2_5_vl_vision",
    hf_model_types=("qwen2_5_vl_vision",),
    rules=ENCODER_RULES + PROJECTOR_RULES,
    context_keys={"num_layers": ("depth", REQUIRED)},
    description="Qwen2.5-VL vision tower + patch merger (Qwen2_5_VisionTransformerPretrainedModel)",
)
