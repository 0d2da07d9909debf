"""Qwen2-MoE / Qwen1.5-MoE (transformers ``Qwen2MoeForCausalLM``) <-> forge.

The Qwen2 layout (q/k/v biases, with ``qkv_bias``) with the Qwen3-MoE router and experts (see
:mod:`forge_ckpt.mapping.families.qwen3_moe`, both expert layouts) plus, on every MoE layer, a
shared expert (gate and up fused as in a dense MLP) and its sigmoid gate::

    layers.{i}.mlp.shared_expert.gate_up_proj.weight <- mlp.shared_expert.{gate,up}_proj.weight
    layers.{i}.mlp.shared_expert.down_proj.weight    <- mlp.shared_expert.down_proj.weight
    layers.{i}.mlp.shared_expert_gate.weight         <- mlp.shared_expert_gate.weight  [1, H]
"""

from __future__ import annotations

from forge_ckpt.mapping.families.llama import (
    ATTN_LAYER_RULES,
    CONTEXT_KEYS,
    EMBEDDING_RULES,
    HEAD_RULES,
    IGNORED_HF,
    attention_bias_rules,
    decoder_hf_shapes,
    dense_mlp_rules,
)
from forge_ckpt.mapping.families.qwen3_moe import (
    MOE_CONTEXT_KEYS,
    MOE_LAYOUT_PROBES,
    MOE_RULES,
    moe_layers,
)
from forge_ckpt.mapping.spec import Concat, MappingSpec, Rule

__all__ = ["MAPPING", "SHARED_EXPERT_RULES"]

_S = "model.layers.{i}.mlp.shared_expert"

SHARED_EXPERT_RULES = (
    Rule(
        "layers.{i}.mlp.shared_expert.gate_up_proj.weight",
        (f"{_S}.gate_proj.weight", f"{_S}.up_proj.weight"),
        concat=Concat(dim=0),
        when="moe_layer",
    ),
    Rule(
        "layers.{i}.mlp.shared_expert.down_proj.weight",
        f"{_S}.down_proj.weight",
        when="moe_layer",
    ),
    Rule(
        "layers.{i}.mlp.shared_expert_gate.weight",
        f"{_S}_gate.weight",
        when="moe_layer",
    ),
)

MAPPING = MappingSpec(
    name="qwen2_moe",
    hf_model_types=("qwen2_moe",),
    rules=(
        EMBEDDING_RULES
        + ATTN_LAYER_RULES
        + attention_bias_rules("qkv_bias", "qkv")
        + dense_mlp_rules("!moe_layer")
        + MOE_RULES
        + SHARED_EXPERT_RULES
        + HEAD_RULES
    ),
    context_keys={**CONTEXT_KEYS, **MOE_CONTEXT_KEYS, "qkv_bias": ("qkv_bias", True)},
    ignored_hf=IGNORED_HF,
    derive=moe_layers,
    layout_probes=MOE_LAYOUT_PROBES,
    description="Qwen2-MoE / Qwen1.5-MoE (Qwen2MoeForCausalLM)",
    hf_shapes=decoder_hf_shapes,
)
