"""Translation between transformers ``config.json`` dicts and :class:`TransformerConfig`.

Reads both the transformers 4.x keys (``rope_theta``, ``rope_scaling``, ``torch_dtype``) and
the 5.x ones (``rope_parameters``, ``dtype``), and writes both, so the folders forge saves load
in either. Features forge does not implement (sliding-window layers, other RoPE types, MLP
biases, activations other than SiLU, attention dropout) raise ``ValueError`` instead of loading
a model that would silently compute something else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from forge_models.config import Llama3RopeScaling, MoEConfig, TransformerConfig, YarnRopeScaling

__all__ = [
    "dense_config_from_hf",
    "dense_config_to_hf",
    "effective_layer_types",
    "moe_config_from_hf",
    "moe_config_to_hf",
    "overlay_hf_config",
    "rope_from_hf",
    "rope_to_hf",
    "sliding_window_off",
]


def rope_from_hf(
    hf: Mapping[str, Any], *, allow_yarn: bool = False
) -> tuple[float, Llama3RopeScaling | YarnRopeScaling | None]:
    """``(rope_theta, scaling or None)`` from either config layout; YaRN only with ``allow_yarn``
    (the families whose attention applies its softmax mscale: DeepSeek-V3)."""
    params = hf.get("rope_parameters")
    if isinstance(params, Mapping) and "rope_theta" in params:
        theta = params["rope_theta"]
        scaling = params
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = hf.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if rope_type == "default":
        return float(theta), None
    if rope_type == "llama3":
        return float(theta), Llama3RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    if rope_type == "yarn" and allow_yarn:
        optional = {k: scaling.get(k) for k in ("mscale", "mscale_all_dim", "attention_factor")}
        if scaling.get("factor") is None:
            raise ValueError("YaRN rope scaling without 'factor' is not supported; set factor")
        return float(theta), YarnRopeScaling(
            factor=float(scaling["factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
            beta_fast=float(scaling.get("beta_fast") or 32),
            beta_slow=float(scaling.get("beta_slow") or 1),
            truncate=bool(scaling.get("truncate", True)),
            **{k: None if v is None else float(v) for k, v in optional.items()},
        )
    supported = ("default", "llama3", "yarn") if allow_yarn else ("default", "llama3")
    raise ValueError(
        f"RoPE type {rope_type!r} is not supported by forge for this family yet (supported: "
        f"{', '.join(map(repr, supported))})"
    )


def rope_to_hf(config: TransformerConfig) -> tuple[dict | None, dict]:
    """``(rope_scaling, rope_parameters)``: the transformers 4.x and 5.x forms of the RoPE."""
    if config.rope_scaling is None:
        return None, {"rope_type": "default", "rope_theta": config.rope_theta}
    kind = "yarn" if isinstance(config.rope_scaling, YarnRopeScaling) else "llama3"
    rope_scaling = {"rope_type": kind, **dataclasses.asdict(config.rope_scaling)}
    return rope_scaling, {**rope_scaling, "rope_theta": config.rope_theta}


def _require_plain(hf: Mapping[str, Any], family: str) -> None:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{family}: hidden_act={act!r} is not supported (forge uses SwiGLU/SiLU)")
    if hf.get("mlp_bias"):
        raise ValueError(f"{family}: mlp_bias=True is not supported")
    if hf.get("attention_dropout"):
        raise ValueError(
            f"{family}: attention_dropout={hf['attention_dropout']} is not supported; set it to 0"
        )
    sliding = [i for i, t in enumerate(effective_layer_types(hf, family)) if t != "full_attention"]
    if sliding:
        raise ValueError(
            f"{family}: sliding-window attention layers are not supported yet (layers {sliding} "
            "of this config.json use a sliding window: use_sliding_window / max_window_layers / "
            "layer_types); set use_sliding_window=false to train with full attention everywhere"
        )


def effective_layer_types(hf: Mapping[str, Any], family: str) -> list[str]:
    """Each layer's attention type as transformers (5.x ``configuration_<family>.py``) derives it
    when ``config.json`` has no ``layer_types``: Qwen2 / Qwen3 slide layers
    ``i >= max_window_layers`` (default 28), Qwen2-MoE even layers ``i < max_window_layers``,
    Qwen3-MoE every layer, and only with ``use_sliding_window`` (and a ``sliding_window``);
    other families slide nowhere unless ``layer_types`` says so."""
    layers = int(hf["num_hidden_layers"])
    if hf.get("layer_types"):
        return list(hf["layer_types"])
    slides = bool(hf.get("use_sliding_window")) and hf.get("sliding_window", 4096) is not None
    window_layers = int(hf.get("max_window_layers", 28))
    rules = {
        "qwen2": lambda i: i >= window_layers,
        "qwen3": lambda i: i >= window_layers,
        "qwen2_moe": lambda i: i % 2 == 0 and i < window_layers,
        "qwen3_moe": lambda i: True,
    }
    rule = rules.get(family, lambda i: False)
    return ["sliding_attention" if slides and rule(i) else "full_attention" for i in range(layers)]


def dense_config_from_hf(
    hf: Mapping[str, Any],
    *,
    family: str,
    attention_bias: bool | None,
    attention_out_bias: bool | None,
    qk_norm: bool,
    allow_yarn: bool = False,
    hf_defaults: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> TransformerConfig:
    """A :class:`TransformerConfig` of ``family`` from a ``config.json`` dict.

    ``attention_bias`` / ``attention_out_bias`` ``None`` read the config's ``attention_bias``
    (default False); a bool fixes them (Qwen2: q/k/v biases, none on o_proj).
    ``hf_defaults``: the family's transformers config class defaults for keys the dict leaves
    out (``max_position_embeddings``, ``num_key_value_heads``, ``head_dim``), so a sparse
    ``config.json`` reads as transformers reads it; a key missing there too, or ``null``,
    takes the derived value (``num_key_value_heads = num_attention_heads``, ``head_dim =
    hidden_size // num_attention_heads``).
    """
    _require_plain(hf, family)
    defaults = dict(hf_defaults or {})

    def read(key: str, fallback: Any) -> Any:
        value = hf[key] if key in hf else defaults.get(key)
        return fallback if value is None else value

    theta, scaling = rope_from_hf(hf, allow_yarn=allow_yarn)
    config_bias = bool(hf.get("attention_bias", False))
    heads = int(hf["num_attention_heads"])
    values: dict[str, Any] = {
        "family": family,
        "vocab_size": int(hf["vocab_size"]),
        "hidden_size": int(hf["hidden_size"]),
        "intermediate_size": int(hf["intermediate_size"]),
        "num_layers": int(hf["num_hidden_layers"]),
        "num_heads": heads,
        "num_kv_heads": int(read("num_key_value_heads", heads)),
        "head_dim": int(read("head_dim", int(hf["hidden_size"]) // heads)),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "max_position_embeddings": int(read("max_position_embeddings", 4096)),
        "rms_norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "attention_bias": config_bias if attention_bias is None else attention_bias,
        "attention_out_bias": config_bias if attention_out_bias is None else attention_out_bias,
        "qk_norm": qk_norm,
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "initializer_range": float(hf.get("initializer_range", 0.02)),
        "pad_token_id": hf.get("pad_token_id"),
    }
    values.update(overrides)
    return TransformerConfig(**values)


def dense_config_to_hf(
    config: TransformerConfig,
    *,
    architecture: str,
    model_type: str,
    write_attention_bias: bool = True,
    extra: Mapping[str, Any] | None = None,
    dtype: str | None = None,
) -> dict[str, Any]:
    """A ``config.json`` dict for ``config`` that transformers 4.x and 5.x load."""
    rope_scaling, rope_parameters = rope_to_hf(config)
    hf: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "initializer_range": config.initializer_range,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_dropout": 0.0,
        "pad_token_id": config.pad_token_id,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": rope_parameters,
        "use_cache": True,
    }
    if write_attention_bias:
        if config.attention_bias != config.attention_out_bias:
            raise ValueError(
                f"{architecture} has one attention_bias switch for q/k/v and o_proj; got "
                f"attention_bias={config.attention_bias}, attention_out_bias={config.attention_out_bias}"
            )
        hf["attention_bias"] = config.attention_bias
    if dtype is not None:
        hf["dtype"] = hf["torch_dtype"] = dtype
    hf.update(extra or {})
    return hf


def sliding_window_off(config: TransformerConfig) -> dict[str, Any]:
    """The sliding-window keys of the Qwen configs, switched off (forge refuses sliding windows)."""
    return {
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": config.num_layers,
    }


def moe_config_from_hf(hf: Mapping[str, Any], *, shared_expert: bool) -> MoEConfig:
    """The :class:`MoEConfig` of a Qwen2-MoE (``shared_expert``) or Qwen3-MoE ``config.json``."""
    # transformers 5.x writes Qwen3-MoE's expert count as ``num_local_experts``.
    experts = hf.get("num_experts") or hf.get("num_local_experts")
    if experts is None:
        raise ValueError("config.json has neither num_experts nor num_local_experts")
    return MoEConfig(
        num_experts=int(experts),
        num_experts_per_tok=int(hf["num_experts_per_tok"]),
        moe_intermediate_size=int(hf["moe_intermediate_size"]),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=(
            int(hf["shared_expert_intermediate_size"]) if shared_expert else 0
        ),
        decoder_sparse_step=int(hf.get("decoder_sparse_step") or 1),
        mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()),
        router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
        output_router_logits=bool(hf.get("output_router_logits", False)),
    )


def moe_config_to_hf(moe: MoEConfig, *, shared_expert: bool) -> dict[str, Any]:
    """The ``config.json`` MoE keys of ``moe``."""
    if shared_expert != (moe.shared_expert_intermediate_size > 0):
        raise ValueError(
            "Qwen2-MoE always has a shared expert (shared_expert_intermediate_size > 0) and "
            "Qwen3-MoE never has one (shared_expert_intermediate_size=0)"
        )
    hf = {
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.num_experts_per_tok,
        "moe_intermediate_size": moe.moe_intermediate_size,
        "norm_topk_prob": moe.norm_topk_prob,
        "decoder_sparse_step": moe.decoder_sparse_step,
        "mlp_only_layers": list(moe.mlp_only_layers),
        "router_aux_loss_coef": moe.router_aux_loss_coef,
        "output_router_logits": moe.output_router_logits,
    }
    if shared_expert:
        hf["shared_expert_intermediate_size"] = moe.shared_expert_intermediate_size
    return hf


#: Keys that transformers reads as another name of a key forge writes (``attribute_map``):
#: when forge changes the canonical key, a source alias takes the new value too.
HF_KEY_ALIASES: dict[str, tuple[str, ...]] = {
    "num_local_experts": ("num_experts", "n_routed_experts"),
    "num_mtp_layers": ("num_nextn_predict_layers",),
    "torch_dtype": ("dtype",),
}


def overlay_hf_config(source: Mapping[str, Any], generated: Mapping[str, Any]) -> dict[str, Any]:
    """The ``config.json`` to export for a model loaded from ``source`` whose forge config has
    since changed (``generated``: ``config_to_hf`` of the model's config).

    The rule: start from ``source``, so keys forge does not read (``bos_token_id``,
    ``eos_token_id``, ``transformers_version``, ``auto_map``, ...) survive; every key of
    ``generated`` takes its new value (forge writes every key its config determines, so the
    architecture is the model's). Keys transformers derives from the architecture but forge
    does not write follow it: an alias of a written key (:data:`HF_KEY_ALIASES`, transformers'
    ``attribute_map``) takes that key's value, and ``layer_types`` becomes full attention for
    each layer (the only kind forge builds; ``generated`` switches sliding windows off).
    """
    out = {**source, **generated}
    for alias, targets in HF_KEY_ALIASES.items():
        value = next((generated[k] for k in targets if k in generated), None)
        if alias in source and alias not in generated and value is not None:
            out[alias] = value
    layers = out.get("num_hidden_layers")
    if "layer_types" in source and "layer_types" not in generated and isinstance(layers, int):
        out["layer_types"] = ["full_attention"] * layers
    return out
