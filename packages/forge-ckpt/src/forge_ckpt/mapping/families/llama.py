"""Llama 2 / Llama 3 / Llama 3.1 / Llama 3.2 (transformers ``LlamaForCausalLM``) <-> forge.

Checkpoint layout: ``model.embed_tokens``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj``,
``model.layers.{i}.mlp.{gate,up,down}_proj``, ``input_layernorm`` / ``post_attention_layernorm``,
``model.norm``, ``lm_head`` (absent, or ignored, with ``tie_word_embeddings``: Llama 3.2 1B/3B).
Forge fuses gate and up into one ``gate_up_proj`` (gate rows first) and pads the vocabulary rows
to ``vocab_pad_multiple``. The rule tuples here are shared by the Qwen families.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from forge_ckpt.mapping.spec import PAD_VOCAB, REQUIRED, Concat, MappingSpec, Rule, Shape

__all__ = [
    "ATTENTION_BIAS_RULES",
    "ATTN_LAYER_RULES",
    "CONTEXT_KEYS",
    "EMBEDDING_RULES",
    "HEAD_RULES",
    "IGNORED_HF",
    "LAYER_RULES",
    "MAPPING",
    "attention_bias_rules",
    "decoder_hf_shapes",
    "dense_mlp_rules",
]

_L = "model.layers.{i}"

EMBEDDING_RULES = (
    Rule("embed_tokens.weight", "model.embed_tokens.weight", transforms=(PAD_VOCAB,)),
)

ATTN_LAYER_RULES = (
    Rule("layers.{i}.attn_norm.weight", f"{_L}.input_layernorm.weight"),
    Rule("layers.{i}.attn.q_proj.weight", f"{_L}.self_attn.q_proj.weight"),
    Rule("layers.{i}.attn.k_proj.weight", f"{_L}.self_attn.k_proj.weight"),
    Rule("layers.{i}.attn.v_proj.weight", f"{_L}.self_attn.v_proj.weight"),
    Rule("layers.{i}.attn.o_proj.weight", f"{_L}.self_attn.o_proj.weight"),
    Rule("layers.{i}.mlp_norm.weight", f"{_L}.post_attention_layernorm.weight"),
)


def dense_mlp_rules(when: str | None = None) -> tuple[Rule, ...]:
    """The SwiGLU MLP (gate and up fused); ``when``: the layers that have it (MoE models)."""
    return (
        Rule(
            "layers.{i}.mlp.gate_up_proj.weight",
            (f"{_L}.mlp.gate_proj.weight", f"{_L}.mlp.up_proj.weight"),
            concat=Concat(dim=0),
            when=when,
        ),
        Rule("layers.{i}.mlp.down_proj.weight", f"{_L}.mlp.down_proj.weight", when=when),
    )


LAYER_RULES = ATTN_LAYER_RULES + dense_mlp_rules()


def attention_bias_rules(when: str | None, projections: str = "qkvo") -> tuple[Rule, ...]:
    """Attention projection biases: Llama and Qwen3 with ``attention_bias`` have them on q, k, v
    and o; Qwen2 always has them on q, k and v only."""
    return tuple(
        Rule(f"layers.{{i}}.attn.{p}_proj.bias", f"{_L}.self_attn.{p}_proj.bias", when=when)
        for p in projections
    )


ATTENTION_BIAS_RULES = attention_bias_rules("attention_bias")

HEAD_RULES = (
    Rule("norm.weight", "model.norm.weight"),
    Rule("lm_head.weight", "lm_head.weight", transforms=(PAD_VOCAB,), when="!tie_word_embeddings"),
)

#: Checkpoint tensors dropped on import: an output matrix saved next to tied embeddings, and the
#: RoPE inverse frequencies some older transformers versions saved as a persistent buffer.
IGNORED_HF = (
    ("lm_head.weight", "tie_word_embeddings"),
    ("model.layers.{i}.self_attn.rotary_emb.inv_freq", None),
)

#: Context read from config.json: key -> (config key, default).
CONTEXT_KEYS = {
    "num_layers": ("num_hidden_layers", REQUIRED),
    "vocab_size": ("vocab_size", REQUIRED),
    "tie_word_embeddings": ("tie_word_embeddings", False),
}


def decoder_hf_shapes(config: Mapping[str, Any], ctx: Mapping[str, Any]) -> dict[str, Shape]:
    """The checkpoint shapes ``config.json`` implies for the Llama-layout tensors (the Qwen
    families share them): q/o ``num_attention_heads x head_dim`` rows/columns, k/v
    ``num_key_value_heads x head_dim`` rows, the dense MLP ``intermediate_size``, norms
    ``hidden_size``. ``head_dim`` defaults to ``hidden_size // num_attention_heads`` as in
    transformers. Keys the config lacks leave their tensors unchecked (an empty dict at worst):
    these shapes only add a check, the rules still decide what is converted.
    """

    def number(key: str) -> int | None:
        value = config.get(key)
        return (
            value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
        )

    hidden, heads = number("hidden_size"), number("num_attention_heads")
    if hidden is None or heads is None:
        return {}
    head_dim = number("head_dim") or hidden // heads
    q, kv = heads * head_dim, (number("num_key_value_heads") or heads) * head_dim
    vocab = int(ctx["vocab_size"])
    shapes: dict[str, Shape] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "lm_head.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        f"{_L}.input_layernorm.weight": (hidden,),
        f"{_L}.post_attention_layernorm.weight": (hidden,),
        f"{_L}.self_attn.q_proj.weight": (q, hidden),
        f"{_L}.self_attn.k_proj.weight": (kv, hidden),
        f"{_L}.self_attn.v_proj.weight": (kv, hidden),
        f"{_L}.self_attn.o_proj.weight": (hidden, q),
        f"{_L}.self_attn.q_proj.bias": (q,),
        f"{_L}.self_attn.k_proj.bias": (kv,),
        f"{_L}.self_attn.v_proj.bias": (kv,),
        f"{_L}.self_attn.o_proj.bias": (hidden,),
        f"{_L}.self_attn.q_norm.weight": (head_dim,),
        f"{_L}.self_attn.k_norm.weight": (head_dim,),
    }
    inter = number("intermediate_size")  # the dense MLP's (MoE families: their dense layers)
    if inter is not None:
        shapes[f"{_L}.mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{_L}.mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{_L}.mlp.down_proj.weight"] = (hidden, inter)
    return shapes


MAPPING = MappingSpec(
    name="llama",
    hf_model_types=("llama",),
    rules=EMBEDDING_RULES + LAYER_RULES + ATTENTION_BIAS_RULES + HEAD_RULES,
    context_keys={**CONTEXT_KEYS, "attention_bias": ("attention_bias", False)},
    ignored_hf=IGNORED_HF,
    description="Llama 2/3/3.1/3.2 (LlamaForCausalLM)",
    hf_shapes=decoder_hf_shapes,
)
