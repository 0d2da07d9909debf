"""Qwen3-MoE: registry entry and size table.

Qwen3 Technical Report, Yang et al. 2025, arXiv:2505.09388: the Qwen3 attention (q/k RMSNorm,
head_dim 128, no biases) with a mixture-of-experts MLP on every layer: 128 fine-grained experts,
8 chosen per token by a softmax router with the top-k probabilities renormalized
(``norm_topk_prob``), no shared expert, trained with the global-batch load-balancing loss.
Hyperparameters are those of the released ``config.json`` files (Qwen/Qwen3-30B-A3B,
Qwen/Qwen3-235B-A22B on the Hugging Face Hub).
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
from forge_models.families.qwen3 import QWEN3_DEFAULTS
from forge_models.parallel_plan import MOE_TP_PLAN
from forge_models.registry import ModelFamily

__all__ = ["FAMILY", "SIZES"]


#: transformers' config class defaults (5.x) for keys a ``config.json`` leaves out.
HF_DEFAULTS = {"max_position_embeddings": 32768, "num_key_value_heads": 4}


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> TransformerConfig:
    overrides.setdefault("moe", moe_config_from_hf(hf, shared_expert=False))
    return dense_config_from_hf(
        hf,
        family="qwen3_moe",
        attention_bias=None,
        attention_out_bias=None,
        qk_norm=True,
        hf_defaults=HF_DEFAULTS,
        **overrides,
    )


def config_to_hf(config: TransformerConfig) -> dict[str, Any]:
    if not config.qk_norm or config.moe is None:
        raise ValueError("a Qwen3-MoE checkpoint has q/k norms (qk_norm=True) and a moe config")
    return dense_config_to_hf(
        config,
        architecture="Qwen3MoeForCausalLM",
        model_type="qwen3_moe",
        extra={
            **sliding_window_off(config),
            **moe_config_to_hf(config.moe, shared_expert=False),
        },
    )


FAMILY = ModelFamily(
    name="qwen3_moe",
    description="Qwen3-MoE decoders: q/k RMSNorm, softmax top-k experts (arXiv:2505.09388)",
    model_cls=CausalLM,
    ckpt_mapping="qwen3_moe",
    hf_model_types=("qwen3_moe",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    tp_plan=MOE_TP_PLAN,
)


def _size(
    d: int, ffn: int, layers: int, heads: int, kv: int, moe: MoEConfig, **kw: Any
) -> TransformerConfig:
    values = {**QWEN3_DEFAULTS, **kw}
    return TransformerConfig(
        family="qwen3_moe",
        hidden_size=d,
        intermediate_size=ffn,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        qk_norm=True,
        tie_word_embeddings=False,
        moe=moe,
        **values,
    )


def _moe(experts: int, top_k: int, ffn: int) -> MoEConfig:
    return MoEConfig(
        num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=ffn,
        norm_topk_prob=True,
    )  # fmt: skip


SIZES: dict[str, TransformerConfig] = {
    "qwen3-30b-a3b": _size(2048, 6144, 48, 32, 4, _moe(128, 8, 768)),
    "qwen3-235b-a22b": _size(4096, 12288, 94, 64, 4, _moe(128, 8, 1536)),
    # Tiny size for tests and debugging.
    "qwen3-moe-debug": _size(64, 160, 2, 4, 2, _moe(8, 2, 32), vocab_size=512, head_dim=32,
                             max_position_embeddings=256),
}  # fmt: skip
