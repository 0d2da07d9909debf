"""DeepSeek-V3 (transformers ``DeepseekV3ForCausalLM``) <-> forge.

DeepSeek-V3 technical report, DeepSeek-AI 2024, arXiv:2412.19437. Multi-head latent attention
(with a q latent when ``q_lora_rank`` is set, else a plain ``q_proj``; biases with
``attention_bias``)::

    layers.{i}.attn.q_proj        <- model.layers.{i}.self_attn.q_proj          (no q latent)
    layers.{i}.attn.q_a_proj      <- self_attn.q_a_proj      (+ .bias)          (q latent)
    layers.{i}.attn.q_a_norm      <- self_attn.q_a_layernorm
    layers.{i}.attn.q_b_proj      <- self_attn.q_b_proj
    layers.{i}.attn.kv_a_proj     <- self_attn.kv_a_proj_with_mqa (+ .bias)
    layers.{i}.attn.kv_a_norm     <- self_attn.kv_a_layernorm
    layers.{i}.attn.kv_b_proj     <- self_attn.kv_b_proj
    layers.{i}.attn.o_proj        <- self_attn.o_proj        (+ .bias)

The first ``first_k_dense_replace`` layers have the dense ``mlp.{gate,up,down}_proj``; the
others are MoE layers: the router and routed experts as Qwen3-MoE's (per-expert or stacked
layout, see :mod:`forge_ckpt.mapping.families.qwen3_moe`), the aux-loss-free selection bias, and
the ungated shared experts (one MLP of width ``n_shared_experts * moe_intermediate_size``)::

    layers.{i}.mlp.expert_bias                 <- mlp.gate.e_score_correction_bias  [E]
    layers.{i}.mlp.shared_expert.gate_up_proj  <- mlp.shared_experts.{gate,up}_proj
    layers.{i}.mlp.shared_expert.down_proj     <- mlp.shared_experts.down_proj

DeepSeek's own release also stores its multi-token prediction module as an extra layer
``model.layers.{num_hidden_layers}.*``; transformers neither loads nor saves it, and this mapping
does not map it (such a checkpoint is reported as having unexpected tensors).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from forge_ckpt.mapping.families.llama import (
    CONTEXT_KEYS,
    EMBEDDING_RULES,
    HEAD_RULES,
    IGNORED_HF,
    dense_mlp_rules,
)
from forge_ckpt.mapping.families.qwen3_moe import MOE_LAYOUT_PROBES, MOE_RULES
from forge_ckpt.mapping.spec import REQUIRED, Concat, MappingSpec, Rule

__all__ = ["MAPPING", "MLA_RULES"]

_L = "model.layers.{i}"
_A = f"{_L}.self_attn"
_S = f"{_L}.mlp.shared_experts"


def _attn(forge: str, hf: str, when: str | tuple[str, ...] | None = None) -> Rule:
    return Rule(f"layers.{{i}}.attn.{forge}", f"{_A}.{hf}", when=when)


#: Norms and multi-head latent attention of every layer.
MLA_RULES = (
    Rule("layers.{i}.attn_norm.weight", f"{_L}.input_layernorm.weight"),
    _attn("q_proj.weight", "q_proj.weight", when="!q_lora"),
    _attn("q_a_proj.weight", "q_a_proj.weight", when="q_lora"),
    _attn("q_a_proj.bias", "q_a_proj.bias", when=("q_lora", "attention_bias")),
    _attn("q_a_norm.weight", "q_a_layernorm.weight", when="q_lora"),
    _attn("q_b_proj.weight", "q_b_proj.weight", when="q_lora"),
    _attn("kv_a_proj.weight", "kv_a_proj_with_mqa.weight"),
    _attn("kv_a_proj.bias", "kv_a_proj_with_mqa.bias", when="attention_bias"),
    _attn("kv_a_norm.weight", "kv_a_layernorm.weight"),
    _attn("kv_b_proj.weight", "kv_b_proj.weight"),
    _attn("o_proj.weight", "o_proj.weight"),
    _attn("o_proj.bias", "o_proj.bias", when="attention_bias"),
    Rule("layers.{i}.mlp_norm.weight", f"{_L}.post_attention_layernorm.weight"),
)

SHARED_EXPERT_RULES = (
    Rule(
        "layers.{i}.mlp.shared_expert.gate_up_proj.weight",
        (f"{_S}.gate_proj.weight", f"{_S}.up_proj.weight"),
        concat=Concat(dim=0),
        when=("moe_layer", "shared_experts"),
    ),
    Rule(
        "layers.{i}.mlp.shared_expert.down_proj.weight",
        f"{_S}.down_proj.weight",
        when=("moe_layer", "shared_experts"),
    ),
)

EXPERT_BIAS_RULES = (
    Rule("layers.{i}.mlp.expert_bias", f"{_L}.mlp.gate.e_score_correction_bias", when="moe_layer"),
)


def _derive(ctx: Mapping[str, Any]) -> dict[str, Any]:
    """``moe_layer``: layers ``first_k_dense_replace`` and up; flags of the optional parts."""
    first_dense = int(ctx["first_k_dense_replace"] or 0)
    experts = int(ctx["num_experts"])
    return {
        "num_experts": experts,
        "moe_layer": frozenset(
            i for i in range(int(ctx["num_layers"])) if experts > 0 and i >= first_dense
        ),
        "q_lora": ctx["q_lora_rank"] is not None,
        "shared_experts": bool(ctx["n_shared_experts"]),
        "stacked_experts": False,
    }


MAPPING = MappingSpec(
    name="deepseek_v3",
    hf_model_types=("deepseek_v3",),
    rules=(
        EMBEDDING_RULES
        + MLA_RULES
        + dense_mlp_rules("!moe_layer")
        + MOE_RULES
        + EXPERT_BIAS_RULES
        + SHARED_EXPERT_RULES
        + HEAD_RULES
    ),
    context_keys={
        **CONTEXT_KEYS,
        "num_experts": ("n_routed_experts", REQUIRED),
        "first_k_dense_replace": ("first_k_dense_replace", 0),
        "n_shared_experts": ("n_shared_experts", 0),
        "q_lora_rank": ("q_lora_rank", None),
        "attention_bias": ("attention_bias", False),
    },
    ignored_hf=IGNORED_HF,
    derive=_derive,
    layout_probes=MOE_LAYOUT_PROBES,
    description="DeepSeek-V3 (DeepseekV3ForCausalLM)",
)
