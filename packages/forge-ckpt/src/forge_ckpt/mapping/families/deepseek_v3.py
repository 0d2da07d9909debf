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

DeepSeek's own release also stores its multi-token prediction (MTP) modules (section 2.2) as
extra layers ``model.layers.{n}.*``, ``n = num_hidden_layers + k`` for ``k <
num_nextn_predict_layers``; transformers neither loads nor saves them. Each is a full decoder
layer (the rules above, for layer index ``n``: dense or MoE by ``first_k_dense_replace``) plus::

    mtp.{k}.block.*        <- model.layers.{n}.*   (as layers.{i}.* <- model.layers.{i}.*)
    mtp.{k}.enorm.weight   <- model.layers.{n}.enorm.weight
    mtp.{k}.hnorm.weight   <- model.layers.{n}.hnorm.weight
    mtp.{k}.eh_proj.weight <- model.layers.{n}.eh_proj.weight         [hidden, 2 * hidden]
    mtp.{k}.norm.weight    <- model.layers.{n}.shared_head.norm.weight

and two copies of shared tensors, written on export (vLLM's and SGLang's MTP loaders read them)
and checked bit for bit against their source on import::

    model.layers.{n}.embed_tokens.weight       == model.embed_tokens.weight
    model.layers.{n}.shared_head.head.weight   == lm_head.weight

Context: ``hf_mtp_depth``, the checkpoint's MTP layers: ``num_nextn_predict_layers`` (0 if
absent), but 0 when the presence probe (:meth:`~forge_ckpt.mapping.MappingSpec.detect_context`)
finds no ``eh_proj`` (transformers writes ``num_nextn_predict_layers=1`` without the tensors);
``mtp_depth``, the model's MTP modules, an option defaulting to ``hf_mtp_depth`` when the probe
found them and to 0 otherwise (unprobed: pass ``mtp_depth`` to map them). Loading into a model
with fewer modules than the checkpoint holds (``mtp_depth=0``: inference without MTP) drops the remaining MTP layers
(``ignored_hf_layers``); asking for more reports their tensors as missing.
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
from forge_ckpt.mapping.spec import REQUIRED, Concat, HFCopy, MappingSpec, Rule

__all__ = ["MAPPING", "MLA_RULES", "MTP_COPIES", "MTP_RULES"]

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


#: The decoder layer of every checkpoint layer (attention, dense or MoE MLP, norms).
LAYER_RULES = (
    MLA_RULES + dense_mlp_rules("!moe_layer") + MOE_RULES + EXPERT_BIAS_RULES + SHARED_EXPERT_RULES
)


def _mtp_block(rule: Rule) -> Rule:
    """``rule`` for the decoder layer of MTP module ``k`` (checkpoint layer ``num_layers + k``)."""
    prefix = "layers.{i}."
    if not rule.forge.startswith(prefix):
        raise ValueError(f"layer rule {rule.forge!r} does not start with {prefix!r}")
    forge = "mtp.{k}.block." + rule.forge.removeprefix(prefix)
    return Rule(forge, rule.hf, rule.concat, rule.transforms, rule.when)


#: The multi-token prediction modules (DeepSeek-V3 section 2.2), one per extra layer.
MTP_RULES = (
    Rule("mtp.{k}.enorm.weight", f"{_L}.enorm.weight"),
    Rule("mtp.{k}.hnorm.weight", f"{_L}.hnorm.weight"),
    Rule("mtp.{k}.eh_proj.weight", f"{_L}.eh_proj.weight"),
    *(_mtp_block(r) for r in LAYER_RULES),
    Rule("mtp.{k}.norm.weight", f"{_L}.shared_head.norm.weight"),
)

#: The embedding and the output head, repeated in every MTP layer of DeepSeek's checkpoints.
MTP_COPIES = (
    HFCopy(f"{_L}.embed_tokens.weight", "model.embed_tokens.weight"),
    HFCopy(f"{_L}.shared_head.head.weight", "lm_head.weight", when="!tie_word_embeddings"),
    HFCopy(
        f"{_L}.shared_head.head.weight", "model.embed_tokens.weight", when="tie_word_embeddings"
    ),
)


def _derive(ctx: Mapping[str, Any]) -> dict[str, Any]:
    """``moe_layer``: layers ``first_k_dense_replace`` and up (MTP layers included); flags of
    the optional parts; the checkpoint's MTP layers the model maps and those it drops."""
    first_dense = int(ctx["first_k_dense_replace"] or 0)
    experts = int(ctx["num_experts"])
    layers = int(ctx["num_layers"])
    # transformers writes num_nextn_predict_layers=1 without the MTP tensors: the model gets
    # MTP modules by default only when the presence probe found them; unprobed, any MTP layers
    # the config announces are dropped if present.
    present = ctx.get("mtp_in_checkpoint")
    in_ckpt = 0 if present is False else int(ctx["num_nextn_predict_layers"])
    depth = int(ctx.get("mtp_depth", in_ckpt if present else 0))
    if depth < 0:
        raise ValueError(f"mtp_depth must be >= 0, got {depth}")
    return {
        "num_experts": experts,
        "moe_layer": frozenset(
            i for i in range(layers + max(depth, in_ckpt)) if experts > 0 and i >= first_dense
        ),
        "q_lora": ctx["q_lora_rank"] is not None,
        "shared_experts": bool(ctx["n_shared_experts"]),
        "stacked_experts": False,
        "hf_mtp_depth": in_ckpt,
        "mtp_depth": depth,
        "num_hf_layers": layers + depth,
        "ignored_hf_layers": frozenset(range(layers + depth, layers + in_ckpt)),
    }


MAPPING = MappingSpec(
    name="deepseek_v3",
    hf_model_types=("deepseek_v3",),
    rules=EMBEDDING_RULES + LAYER_RULES + MTP_RULES + HEAD_RULES,
    context_keys={
        **CONTEXT_KEYS,
        "num_experts": ("n_routed_experts", REQUIRED),
        "first_k_dense_replace": ("first_k_dense_replace", 0),
        "n_shared_experts": ("n_shared_experts", 0),
        "q_lora_rank": ("q_lora_rank", None),
        "attention_bias": ("attention_bias", False),
        "num_nextn_predict_layers": ("num_nextn_predict_layers", 0),
    },
    ignored_hf=IGNORED_HF,
    hf_copies=MTP_COPIES,
    derive=_derive,
    layout_probes=MOE_LAYOUT_PROBES,
    presence_probes=(("mtp_in_checkpoint", ".eh_proj.weight"),),
    description="DeepSeek-V3 (DeepseekV3ForCausalLM)",
)
