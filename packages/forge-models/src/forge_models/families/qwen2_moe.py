"""Qwen2-MoE and Qwen1.5-MoE: registry entry and size table.

Qwen2 Technical Report, Yang et al. 2024, arXiv:2407.10671 (Qwen2-57B-A14B), and the
Qwen1.5-MoE-A2.7B release (Qwen Team 2024): the Qwen2 attention (q/k/v biases) with a
mixture-of-experts MLP: a softmax top-k router over fine-grained experts plus a shared expert
that every token uses, scaled per token by ``sigmoid(x @ shared_expert_gate)``.
Hyperparameters are those of the released ``config.json`` files (Qwen/Qwen2-57B-A14B,
Qwen/Qwen1.5-MoE-A2.7B on the Hugging Face Hub).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from forge_models.causal_lm import CausalLM
from forge_models.config import MoEConfig, TransformerConfig
from forge_models.families._hf_config import (
    dense_config_from_hf,
    dense_config_to_hf,
    moe_config_from_hf,
    moe_config_to_hf,
    sliding_window_off,
)
from forge_models.parallel_plan import MOE_TP_PLAN
from forge_models.registry import ModelFamily

__all__ = ["FAMILY", "SIZES"]


#: transformers' config class defaults (5.x) for keys a ``config.json`` leaves out.
HF_DEFAULTS = {"max_position_embeddings": 32768, "num_key_value_heads": 16}


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> TransformerConfig:
    overrides.setdefault("moe", moe_config_from_hf(hf, shared_expert=True))
    # transformers 5.x writes ``qkv_bias`` (default True); 4.x configs always had the biases.
    qkv_bias = bool(hf.get("qkv_bias", True))
    return dense_config_from_hf(
        hf,
        family="qwen2_moe",
        attention_bias=qkv_bias,
        attention_out_bias=False,
        qk_norm=False,
        hf_defaults=HF_DEFAULTS,
        **overrides,
    )


def config_to_hf(config: TransformerConfig) -> dict[str, Any]:
    if config.attention_out_bias or config.qk_norm or config.moe is None:
        raise ValueError(
            "a Qwen2-MoE checkpoint has no o_proj bias and no q/k norm, and needs a moe config"
        )
    return dense_config_to_hf(
        config,
        architecture="Qwen2MoeForCausalLM",
        model_type="qwen2_moe",
        write_attention_bias=False,
        extra={
            "qkv_bias": config.attention_bias,
            **sliding_window_off(config),
            **moe_config_to_hf(config.moe, shared_expert=True),
        },
    )


FAMILY = ModelFamily(
    name="qwen2_moe",
    description="Qwen2-MoE / Qwen1.5-MoE: top-k experts plus a gated shared expert (arXiv:2407.10671)",
    model_cls=CausalLM,
    ckpt_mapping="qwen2_moe",
    hf_model_types=("qwen2_moe",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    tp_plan=MOE_TP_PLAN,
)


def _size(
    vocab: int,
    d: int,
    ffn: int,
    layers: int,
    heads: int,
    kv: int,
    moe: MoEConfig,
    *,
    max_pos: int,
) -> TransformerConfig:
    return TransformerConfig(
        family="qwen2_moe", vocab_size=vocab, hidden_size=d, intermediate_size=ffn,
        num_layers=layers, num_heads=heads, num_kv_heads=kv, rope_theta=1000000.0,
        max_position_embeddings=max_pos, rms_norm_eps=1e-6, attention_bias=True, moe=moe,
    )  # fmt: skip


def _moe(experts: int, top_k: int, ffn: int, shared: int) -> MoEConfig:
    return MoEConfig(
        num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=ffn,
        shared_expert_intermediate_size=shared, norm_topk_prob=False,
    )  # fmt: skip


SIZES: dict[str, TransformerConfig] = {
    "qwen1.5-moe-a2.7b": _size(151936, 2048, 5632, 24, 16, 16, _moe(60, 4, 1408, 5632), max_pos=8192),
    "qwen2-57b-a14b": _size(151936, 3584, 18944, 28, 28, 4, _moe(64, 8, 2560, 20480), max_pos=32768),
    # Tiny size for tests and debugging.
    "qwen2-moe-debug": _size(512, 64, 160, 2, 4, 2, _moe(8, 2, 32, 48), max_pos=256),
}  # fmt: skip
