"""Qwen2 and Qwen2.5 (dense): registry entry and size table.

Qwen2 Technical Report, Yang et al. 2024, arXiv:2407.10671, and Qwen2.5 Technical Report, Qwen
Team 2024, arXiv:2412.15115: the Llama block with biases on the q/k/v projections, GQA, RoPE
base 10^6, a 151,646-token vocabulary (embedding rows padded to 151,936 or 152,064), and tied
embeddings for the small models. Hyperparameters are those of the released ``config.json``
files (Qwen/* on the Hugging Face Hub).
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

__all__ = ["FAMILY", "SIZES"]


#: transformers' config class defaults (5.x) for keys a ``config.json`` leaves out.
HF_DEFAULTS = {"max_position_embeddings": 32768, "num_key_value_heads": 32}


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> TransformerConfig:
    return dense_config_from_hf(
        hf,
        family="qwen2",
        attention_bias=True,
        attention_out_bias=False,
        qk_norm=False,
        hf_defaults=HF_DEFAULTS,
        **overrides,
    )


def config_to_hf(config: TransformerConfig) -> dict[str, Any]:
    if not config.attention_bias or config.attention_out_bias:
        raise ValueError(
            "a Qwen2 checkpoint always has q/k/v biases and no o_proj bias "
            "(attention_bias=True, attention_out_bias=False)"
        )
    return dense_config_to_hf(
        config,
        architecture="Qwen2ForCausalLM",
        model_type="qwen2",
        write_attention_bias=False,
        extra=sliding_window_off(config),
    )


FAMILY = ModelFamily(
    name="qwen2",
    description="Qwen2/Qwen2.5 dense decoders with q/k/v bias (arXiv:2407.10671, arXiv:2412.15115)",
    model_cls=CausalLM,
    ckpt_mapping="qwen2",
    hf_model_types=("qwen2",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    tp_plan=DENSE_TP_PLAN,
)


def _size(
    vocab: int,
    d: int,
    ffn: int,
    layers: int,
    heads: int,
    kv: int,
    *,
    tied: bool,
    max_pos: int = 131072,
    eps: float = 1e-6,
) -> TransformerConfig:
    return TransformerConfig(
        family="qwen2",
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=ffn,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        rope_theta=1000000.0,
        max_position_embeddings=max_pos,
        rms_norm_eps=eps,
        attention_bias=True,
        tie_word_embeddings=tied,
    )  # fmt: skip


SIZES: dict[str, TransformerConfig] = {
    "qwen2-0.5b": _size(151936, 896, 4864, 24, 14, 2, tied=True),
    "qwen2-1.5b": _size(151936, 1536, 8960, 28, 12, 2, tied=True),
    "qwen2-7b": _size(152064, 3584, 18944, 28, 28, 4, tied=False),
    "qwen2-72b": _size(152064, 8192, 29568, 80, 64, 8, tied=False, eps=1e-5),
    "qwen2.5-0.5b": _size(151936, 896, 4864, 24, 14, 2, tied=True, max_pos=32768),
    "qwen2.5-1.5b": _size(151936, 1536, 8960, 28, 12, 2, tied=True),
    "qwen2.5-3b": _size(151936, 2048, 11008, 36, 16, 2, tied=True, max_pos=32768),
    "qwen2.5-7b": _size(152064, 3584, 18944, 28, 28, 4, tied=False),
    "qwen2.5-14b": _size(152064, 5120, 13824, 48, 40, 8, tied=False, eps=1e-5),
    "qwen2.5-32b": _size(152064, 5120, 27648, 64, 40, 8, tied=False, eps=1e-5),
    "qwen2.5-72b": _size(152064, 8192, 29568, 80, 64, 8, tied=False, eps=1e-5),
    # Tiny size for tests and debugging.
    "qwen2-debug": _size(512, 64, 160, 2, 4, 2, tied=True, max_pos=256),
}
