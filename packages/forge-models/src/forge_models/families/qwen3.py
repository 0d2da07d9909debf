"""Qwen3 (dense): registry entry and size table.

Qwen3 Technical Report, Yang et al. 2025, arXiv:2505.09388: the Llama block without q/k/v
biases, with RMSNorm over the head dim of q and k before RoPE (QK-norm), head_dim 128 decoupled
from the hidden size, RoPE base 10^6, tied embeddings up to 4B. Hyperparameters are those of
the released ``config.json`` files (Qwen/Qwen3-* on the Hugging Face Hub).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from forge_models.causal_lm import CausalLM
from forge_models.config import TransformerConfig
from forge_models.families._hf_config import (
    dense_config_from_hf,
    dense_config_to_hf,
    sliding_window_off,
)
from forge_models.parallel_plan import DENSE_TP_PLAN
from forge_models.registry import ModelFamily

__all__ = ["FAMILY", "QWEN3_DEFAULTS", "SIZES"]


#: transformers' config class defaults (5.x) for keys a ``config.json`` leaves out.
HF_DEFAULTS = {"max_position_embeddings": 32768, "num_key_value_heads": 32, "head_dim": 128}


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> TransformerConfig:
    return dense_config_from_hf(
        hf,
        family="qwen3",
        attention_bias=None,
        attention_out_bias=None,
        qk_norm=True,
        hf_defaults=HF_DEFAULTS,
        **overrides,
    )


def config_to_hf(config: TransformerConfig) -> dict[str, Any]:
    if not config.qk_norm:
        raise ValueError("a Qwen3 checkpoint always has q/k norms (qk_norm=True)")
    return dense_config_to_hf(
        config,
        architecture="Qwen3ForCausalLM",
        model_type="qwen3",
        extra=sliding_window_off(config),
    )


FAMILY = ModelFamily(
    name="qwen3",
    description="Qwen3 dense decoders with q/k RMSNorm (arXiv:2505.09388)",
    model_cls=CausalLM,
    ckpt_mapping="qwen3",
    hf_model_types=("qwen3",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    tp_plan=DENSE_TP_PLAN,
)


#: What every released Qwen3 model shares (dense and MoE).
QWEN3_DEFAULTS = {
    "vocab_size": 151936,
    "head_dim": 128,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
}


def _size(
    d: int, ffn: int, layers: int, heads: int, kv: int, *, tied: bool, **kw
) -> TransformerConfig:
    values = {**QWEN3_DEFAULTS, **kw}
    return TransformerConfig(
        family="qwen3",
        hidden_size=d,
        intermediate_size=ffn,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        qk_norm=True,
        tie_word_embeddings=tied,
        **values,
    )


SIZES: dict[str, TransformerConfig] = {
    "qwen3-0.6b": _size(1024, 3072, 28, 16, 8, tied=True),
    "qwen3-1.7b": _size(2048, 6144, 28, 16, 8, tied=True),
    "qwen3-4b": _size(2560, 9728, 36, 32, 8, tied=True),
    "qwen3-8b": _size(4096, 12288, 36, 32, 8, tied=False),
    "qwen3-14b": _size(5120, 17408, 40, 40, 8, tied=False),
    "qwen3-32b": _size(5120, 25600, 64, 64, 8, tied=False),
    # Tiny size for tests and debugging: head_dim (32) != hidden / heads (16), as in Qwen3.
    "qwen3-debug": _size(64, 160, 2, 4, 2, tied=True, vocab_size=512, head_dim=32,
                         max_position_embeddings=256),
}  # fmt: skip
