"""Qwen3 dense (transformers ``Qwen3ForCausalLM``) <-> forge.

The Llama layout plus a per-head RMSNorm on queries and keys (``q_norm``/``k_norm``, Qwen3
Technical Report, Yang et al. 2025, arXiv:2505.09388); q/k/v biases only with
``attention_bias``.
"""

from __future__ import annotations

from forge_ckpt.mapping.families.llama import (
    ATTENTION_BIAS_RULES,
    CONTEXT_KEYS,
    EMBEDDING_RULES,
    HEAD_RULES,
    IGNORED_HF,
    LAYER_RULES,
    decoder_hf_shapes,
)
from forge_ckpt.mapping.spec import MappingSpec, Rule

__all__ = ["MAPPING"]

QK_NORM_RULES = (
    Rule("layers.{i}.attn.q_norm.weight", "model.layers.{i}.self_attn.q_norm.weight"),
    Rule("layers.{i}.attn.k_norm.weight", "model.layers.{i}.self_attn.k_norm.weight"),
)

MAPPING = MappingSpec(
    name="qwen3",
    hf_model_types=("qwen3",),
    rules=EMBEDDING_RULES + LAYER_RULES + QK_NORM_RULES + ATTENTION_BIAS_RULES + HEAD_RULES,
    context_keys={**CONTEXT_KEYS, "attention_bias": ("attention_bias", False)},
    ignored_hf=IGNORED_HF,
    description="Qwen3 dense (Qwen3ForCausalLM)",
    hf_shapes=decoder_hf_shapes,
)
