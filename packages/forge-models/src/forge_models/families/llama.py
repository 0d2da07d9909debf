"""Llama 2, Llama 3, Llama 3.1 and Llama 3.2 (text): registry entry and size table.

- Llama 2: Touvron et al. 2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models",
  arXiv:2307.09288 (GQA only in 70B; 4k context; 32k vocabulary).
- Llama 3 / 3.1 / 3.2: Dubey et al. 2024, "The Llama 3 Herd of Models", arXiv:2407.21783
  (128k vocabulary, GQA with 8 kv heads, RoPE base 500000, 3.1+ rescale the RoPE frequencies for
  128k context; 3.2 1B/3B tie the embeddings).

Hyperparameters are those of the released ``config.json`` files (meta-llama/* on the Hugging
Face Hub).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from forge_models.causal_lm import CausalLM
from forge_models.config import Llama3RopeScaling, TransformerConfig
from forge_models.families._hf_config import dense_config_from_hf, dense_config_to_hf
from forge_models.parallel_plan import DENSE_TP_PLAN
from forge_models.registry import ModelFamily

__all__ = ["FAMILY", "SIZES"]


#: transformers' config class defaults (5.x) for keys a ``config.json`` leaves out.
HF_DEFAULTS = {"max_position_embeddings": 2048}


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> TransformerConfig:
    return dense_config_from_hf(
        hf,
        family="llama",
        attention_bias=None,
        attention_out_bias=None,
        qk_norm=False,
        hf_defaults=HF_DEFAULTS,
        **overrides,
    )


def config_to_hf(config: TransformerConfig) -> dict[str, Any]:
    return dense_config_to_hf(
        config,
        architecture="LlamaForCausalLM",
        model_type="llama",
        extra={"mlp_bias": False, "pretraining_tp": 1},
    )


FAMILY = ModelFamily(
    name="llama",
    description="Llama 2/3/3.1/3.2 dense decoders (arXiv:2307.09288, arXiv:2407.21783)",
    model_cls=CausalLM,
    ckpt_mapping="llama",
    hf_model_types=("llama",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    tp_plan=DENSE_TP_PLAN,
)

_LLAMA2 = {"vocab_size": 32000, "rope_theta": 10000.0, "max_position_embeddings": 4096}
_LLAMA3 = {"vocab_size": 128256, "rope_theta": 500000.0, "max_position_embeddings": 8192}
_LLAMA31 = {
    **_LLAMA3,
    "max_position_embeddings": 131072,
    "rope_scaling": Llama3RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    ),
}
_LLAMA32 = {
    **_LLAMA31,
    "rope_scaling": Llama3RopeScaling(
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
    "tie_word_embeddings": True,
}


def _size(
    common: dict, d: int, ffn: int, layers: int, heads: int, kv: int, **kw
) -> TransformerConfig:
    return TransformerConfig(
        family="llama",
        hidden_size=d,
        intermediate_size=ffn,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        rms_norm_eps=1e-5,
        **{**common, **kw},
    )


SIZES: dict[str, TransformerConfig] = {
    "llama2-7b": _size(_LLAMA2, 4096, 11008, 32, 32, 32),
    "llama2-13b": _size(_LLAMA2, 5120, 13824, 40, 40, 40),
    "llama2-70b": _size(_LLAMA2, 8192, 28672, 80, 64, 8),
    "llama3-8b": _size(_LLAMA3, 4096, 14336, 32, 32, 8),
    "llama3-70b": _size(_LLAMA3, 8192, 28672, 80, 64, 8),
    "llama3.1-8b": _size(_LLAMA31, 4096, 14336, 32, 32, 8),
    "llama3.1-70b": _size(_LLAMA31, 8192, 28672, 80, 64, 8),
    "llama3.1-405b": _size(_LLAMA31, 16384, 53248, 126, 128, 8),
    "llama3.2-1b": _size(_LLAMA32, 2048, 8192, 16, 32, 8, head_dim=64),
    "llama3.2-3b": _size(_LLAMA32, 3072, 8192, 28, 24, 8, head_dim=128),
    # Tiny sizes for tests and debugging.
    "llama-debug": _size(
        {"vocab_size": 512, "rope_theta": 10000.0, "max_position_embeddings": 256},
        64, 160, 2, 4, 2,
    ),
    "llama3-debug": _size(
        {
            **_LLAMA32,
            "vocab_size": 512,
            "max_position_embeddings": 256,
            "rope_scaling": Llama3RopeScaling(
                factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        },
        64, 160, 2, 4, 1,
    ),
}  # fmt: skip
