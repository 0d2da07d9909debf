"""Qwen2 / Qwen2.5 (transformers ``Qwen2ForCausalLM``) <-> forge.

The Llama layout plus q/k/v projection biases on every layer (Qwen2 Technical Report, Yang et
al. 2024, arXiv:2407.10671); the small models tie their embeddings.
"""

from __future__ import annotations

from forge_ckpt.mapping.families.llama import (
    CONTEXT_KEYS,
    EMBEDDING_RULES,
    HEAD_RULES,
    IGNORED_HF,
    LAYER_RULES,
    attention_bias_rules,
    decoder_hf_shapes,
)
from forge_ckpt.mapping.spec import MappingSpec

__all__ = ["MAPPING"]

MAPPING = MappingSpec(
    name="qwen2",
    hf_model_types=("qwen2",),
    rules=EMBEDDING_RULES + LAYER_RULES + attention_bias_rules(None, "qkv") + HEAD_RULES,
    context_keys=CONTEXT_KEYS,
    ignored_hf=IGNORED_HF,
    description="Qwen2/Qwen2.5 (Qwen2ForCausalLM)",
    hf_shapes=decoder_hf_shapes,
)
