"""Hugging Face <-> Megatron-Core ``GPTModel`` name and layout mappings, per family, as data
(the vision-language families' ``LLaVAModel`` mappings: :mod:`~forge_ckpt.megatron.vlm_families`).

Each family is a :class:`~forge_ckpt.mapping.MappingSpec` whose target side (``forge`` in the
spec's vocabulary) holds the full, unsharded Megatron-Core tensor names of a ``GPTModel``
(``decoder.layers.{i}...`` with global layer numbers)::

    embedding.word_embeddings.weight            <- model.embed_tokens.weight (vocab padded)
    decoder.layers.{i}.self_attention.linear_qkv.weight
                                                 <- q_proj + k_proj + v_proj  [GroupedQKV]
    decoder.layers.{i}.self_attention.linear_proj.weight  <- o_proj
    decoder.layers.{i}.mlp.linear_fc1.weight    <- gate_proj + up_proj  [concat dim 0]
    decoder.layers.{i}.mlp.linear_fc2.weight    <- down_proj
    decoder.final_layernorm.weight, output_layer.weight (absent when tied)

The norms depend on the layer spec (context flag ``te_spec``): Transformer Engine specs (Megatron
-LM's default) fuse the input norm into ``linear_qkv.layer_norm_weight`` and, on dense layers,
the MLP norm into ``linear_fc1.layer_norm_weight``; the local spec keeps ``input_layernorm`` and
``pre_mlp_layernorm`` (as do the MoE layers of TE specs). Mixture-of-experts layers hold
``mlp.router.weight`` and per-expert ``mlp.experts.local_experts.{j}.linear_fc{1,2}.weight``
(``SequentialMLP``) or, with ``grouped_gemm``, ``mlp.experts.linear_fc{1,2}.weight{j}``
(``TEGroupedMLP``); shared experts are ``mlp.shared_experts.*`` (Qwen2-MoE adds the sigmoid
``shared_experts.gate_weight``). DeepSeek-V3's multi-head latent attention (DeepSeek-V3
Technical Report, arXiv:2412.19437) maps ``q_a_proj``/``q_b_proj``/``kv_a_proj_with_mqa``/
``kv_b_proj`` to ``linear_q_down_proj``/``linear_q_up_proj``/``linear_kv_down_proj``/
``linear_kv_up_proj`` unchanged in layout. Names were checked against megatron-core 0.16's
``GPTModel.state_dict()`` on CPU (local spec) and its ``gpt_layer_specs`` (TE spec).

DeepSeek-V3's multi-token prediction (MTP) layers (section 2.2 of the report; checkpoint layers
``model.layers.{n}``, ``n = num_hidden_layers + k``, as DeepSeek's release stores them) map to
Megatron-Core's ``MultiTokenPredictionBlock`` (``--mtp-num-layers``), on the last pipeline stage::

    mtp.layers.{k}.enorm.weight / hnorm.weight  <- model.layers.{n}.enorm / hnorm.weight
    mtp.layers.{k}.eh_proj.weight               <- model.layers.{n}.eh_proj.weight  [column TP]
    mtp.layers.{k}.transformer_layer.*          <- model.layers.{n}.* (as decoder.layers.{i}.*)
    mtp.layers.{k}.final_layernorm.weight       <- model.layers.{n}.shared_head.norm.weight

(``transformer_layer`` is the name Megatron-Core's checkpoints keep; newer module trees call it
``mtp_model_layer`` and map it back on save; the legacy reader accepts both). The embedding and
head copies DeepSeek stores in each MTP layer are checked on the way in and written on the way
out, as in :mod:`forge_ckpt.mapping.families.deepseek_v3`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from forge_ckpt.mapping.families.deepseek_v3 import MTP_COPIES
from forge_ckpt.mapping.families.qwen3_moe import moe_layers
from forge_ckpt.mapping.spec import PAD_VOCAB, REQUIRED, Concat, GroupedQKV, MappingSpec, Rule

__all__ = ["MEGATRON_FAMILIES", "MegatronFamily", "get_megatron_family", "list_megatron_families"]

_H = "model.layers.{i}"
_M = "decoder.layers.{i}"
_GATE_UP = Concat(dim=0)


def _r(megatron: str, hf: str | tuple[str, ...], **kw: Any) -> Rule:
    return Rule(megatron, hf, **kw)


EMBEDDING = (
    _r("embedding.word_embeddings.weight", "model.embed_tokens.weight", transforms=(PAD_VOCAB,)),
)
HEAD = (
    _r("decoder.final_layernorm.weight", "model.norm.weight"),
    _r(
        "output_layer.weight",
        "lm_head.weight",
        transforms=(PAD_VOCAB,),
        when="!tie_word_embeddings",
    ),
)


def gqa_attention(qkv_bias: str | None, qk_norm: bool) -> tuple[Rule, ...]:
    """Self-attention with a fused, group-interleaved ``linear_qkv`` (and its norms)."""
    a = f"{_M}.self_attention"
    rules = [
        _r(f"{a}.linear_qkv.layer_norm_weight", f"{_H}.input_layernorm.weight", when="te_spec"),
        _r(f"{_M}.input_layernorm.weight", f"{_H}.input_layernorm.weight", when="!te_spec"),
        _r(
            f"{a}.linear_qkv.weight",
            tuple(f"{_H}.self_attn.{p}_proj.weight" for p in "qkv"),
            concat=GroupedQKV(),
        ),
        _r(f"{a}.linear_proj.weight", f"{_H}.self_attn.o_proj.weight"),
    ]
    if qkv_bias is not None:
        rules.append(
            _r(
                f"{a}.linear_qkv.bias",
                tuple(f"{_H}.self_attn.{p}_proj.bias" for p in "qkv"),
                concat=GroupedQKV(),
                when=qkv_bias or None,
            )
        )
    if qk_norm:
        rules += [
            _r(f"{a}.q_layernorm.weight", f"{_H}.self_attn.q_norm.weight"),
            _r(f"{a}.k_layernorm.weight", f"{_H}.self_attn.k_norm.weight"),
        ]
    return tuple(rules)


def mla_attention() -> tuple[Rule, ...]:
    """DeepSeek-V3 multi-head latent attention (``q_lora`` flag: low-rank queries)."""
    a, s = f"{_M}.self_attention", f"{_H}.self_attn"
    return (
        _r(f"{_M}.input_layernorm.weight", f"{_H}.input_layernorm.weight"),
        _r(f"{a}.linear_q_proj.weight", f"{s}.q_proj.weight", when="!q_lora"),
        _r(f"{a}.linear_q_down_proj.weight", f"{s}.q_a_proj.weight", when="q_lora"),
        _r(f"{a}.linear_q_up_proj.layer_norm_weight", f"{s}.q_a_layernorm.weight", when=("q_lora", "te_spec")),
        _r(f"{a}.q_layernorm.weight", f"{s}.q_a_layernorm.weight", when=("q_lora", "!te_spec")),
        _r(f"{a}.linear_q_up_proj.weight", f"{s}.q_b_proj.weight", when="q_lora"),
        _r(f"{a}.linear_kv_down_proj.weight", f"{s}.kv_a_proj_with_mqa.weight"),
        _r(f"{a}.linear_kv_up_proj.layer_norm_weight", f"{s}.kv_a_layernorm.weight", when="te_spec"),
        _r(f"{a}.kv_layernorm.weight", f"{s}.kv_a_layernorm.weight", when="!te_spec"),
        _r(f"{a}.linear_kv_up_proj.weight", f"{s}.kv_b_proj.weight"),
        _r(f"{a}.linear_proj.weight", f"{s}.o_proj.weight"),
    )  # fmt: skip


def dense_mlp(when: str | None = None) -> tuple[Rule, ...]:
    """The MLP norm (fused on TE dense layers) and the SwiGLU MLP; ``when``: its layers."""
    m = f"{_H}.mlp"
    return (
        _r(f"{_M}.mlp.linear_fc1.layer_norm_weight", f"{_H}.post_attention_layernorm.weight", when="fused_mlp_norm"),
        _r(f"{_M}.pre_mlp_layernorm.weight", f"{_H}.post_attention_layernorm.weight", when="!fused_mlp_norm"),
        _r(f"{_M}.mlp.linear_fc1.weight", (f"{m}.gate_proj.weight", f"{m}.up_proj.weight"), concat=_GATE_UP, when=when),
        _r(f"{_M}.mlp.linear_fc2.weight", f"{m}.down_proj.weight", when=when),
    )  # fmt: skip


def moe_mlp(shared: str | None, shared_gate: bool, expert_bias: bool) -> tuple[Rule, ...]:
    """Router, routed experts (both Megatron layouts) and shared experts of the MoE layers."""
    e, x = f"{_H}.mlp.experts.{{j}}", f"{_M}.mlp.experts"
    seq, grouped = ("moe_layer", "!grouped_gemm"), ("moe_layer", "grouped_gemm")
    fc1_hf = (f"{e}.gate_proj.weight", f"{e}.up_proj.weight")
    rules = [
        _r(f"{_M}.mlp.router.weight", f"{_H}.mlp.gate.weight", when="moe_layer"),
        _r(f"{x}.local_experts.{{j}}.linear_fc1.weight", fc1_hf, concat=_GATE_UP, when=seq),
        _r(f"{x}.local_experts.{{j}}.linear_fc2.weight", f"{e}.down_proj.weight", when=seq),
        _r(f"{x}.linear_fc1.weight{{j}}", fc1_hf, concat=_GATE_UP, when=grouped),
        _r(f"{x}.linear_fc2.weight{{j}}", f"{e}.down_proj.weight", when=grouped),
    ]
    if expert_bias:
        rules.append(
            _r(f"{_M}.mlp.router.expert_bias", f"{_H}.mlp.gate.e_score_correction_bias", when="moe_layer")
        )  # fmt: skip
    if shared is not None:
        s, t = f"{_H}.mlp.{shared}", f"{_M}.mlp.shared_experts"
        rules += [
            _r(f"{t}.linear_fc1.weight", (f"{s}.gate_proj.weight", f"{s}.up_proj.weight"), concat=_GATE_UP, when="moe_layer"),
            _r(f"{t}.linear_fc2.weight", f"{s}.down_proj.weight", when="moe_layer"),
        ]  # fmt: skip
        if shared_gate:
            rules.append(_r(f"{t}.gate_weight", f"{s}_gate.weight", when="moe_layer"))
    return tuple(rules)


def mtp_layers(layer_rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
    """Megatron-Core's MTP layers: the projections and norms around a decoder layer built by
    ``layer_rules`` (checkpoint layer ``{i}`` = ``num_layers + k``)."""
    m, h = "mtp.layers.{k}", _H
    block = tuple(
        Rule(f"{m}.transformer_layer.{r.forge.removeprefix(_M + '.')}", r.hf, r.concat, r.transforms, r.when)
        for r in layer_rules
    )  # fmt: skip
    return (
        _r(f"{m}.enorm.weight", f"{h}.enorm.weight"),
        _r(f"{m}.hnorm.weight", f"{h}.hnorm.weight"),
        _r(f"{m}.eh_proj.weight", f"{h}.eh_proj.weight"),
        *block,
        _r(f"{m}.final_layernorm.weight", f"{h}.shared_head.norm.weight"),
    )


# --------------------------------------------------------------------------------------------
# Context
# --------------------------------------------------------------------------------------------

_BASE_KEYS = {
    "num_layers": ("num_hidden_layers", REQUIRED),
    "vocab_size": ("vocab_size", REQUIRED),
    "hidden_size": ("hidden_size", REQUIRED),
    "tie_word_embeddings": ("tie_word_embeddings", False),
    "num_attention_heads": ("num_attention_heads", REQUIRED),
    "num_key_value_heads": ("num_key_value_heads", None),
    "head_dim": ("head_dim", None),
}
_MOE_KEYS = {
    "num_experts": ("num_experts", None),
    "num_local_experts": ("num_local_experts", None),
    "decoder_sparse_step": ("decoder_sparse_step", 1),
    "mlp_only_layers": ("mlp_only_layers", ()),
}


def _gqa_derive(ctx: Mapping[str, Any]) -> dict[str, Any]:
    heads = int(ctx["num_attention_heads"])
    out = {"num_key_value_heads": ctx["num_key_value_heads"] or heads}
    if ctx["head_dim"] is None:
        out["head_dim"] = int(ctx["hidden_size"]) // heads
    return out


def _deepseek_derive(ctx: Mapping[str, Any]) -> dict[str, Any]:
    """MoE layers (MTP layers included) and the MTP depth, as the forge DeepSeek-V3 mapping
    derives them: ``mtp_depth`` defaults to the checkpoint's MTP layers when the presence probe
    found them (transformers announces ``num_nextn_predict_layers`` without saving them)."""
    first_dense = int(ctx["first_k_dense_replace"])
    num_layers = int(ctx["num_layers"])
    present = ctx.get("mtp_in_checkpoint")
    in_ckpt = 0 if present is False else int(ctx["num_nextn_predict_layers"] or 0)
    depth = int(ctx.get("mtp_depth", in_ckpt if present else 0))
    if depth < 0:
        raise ValueError(f"mtp_depth must be >= 0, got {depth}")
    layers = frozenset(
        i
        for i in range(num_layers + max(depth, in_ckpt))
        if i >= first_dense and int(ctx["num_experts"]) > 0
    )
    return {
        "moe_layer": layers,
        "q_lora": ctx["q_lora_rank"] is not None,
        "mtp_depth": depth,
        "num_hf_layers": num_layers + depth,
        "ignored_hf_layers": frozenset(range(num_layers + depth, num_layers + in_ckpt)),
    }


def _with_layout(
    derive: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None,
) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """The family's derived context plus the layer-spec flags every Megatron mapping uses."""

    def run(ctx: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"te_spec": True, "grouped_gemm": False, "moe_layer": frozenset()}
        for step in (_gqa_derive, derive):
            if step is not None:
                out.update(step({**ctx, **out}))
        out["te_spec"] = ctx.get("te_spec", out["te_spec"])
        moe = ctx.get("moe_layer", out["moe_layer"])
        layers = range(int(out.get("num_hf_layers", ctx["num_layers"])))
        out["fused_mlp_norm"] = (
            frozenset(i for i in layers if i not in moe) if out["te_spec"] else frozenset()
        )
        return out

    return run


# --------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MegatronFamily:
    """One model family's HF <-> Megatron-Core mapping and the facts its writers need.

    Args:
        name: the family (the forge_ckpt mapping name: ``"llama"``).
        mapping: the :class:`MappingSpec` (target side: unsharded Megatron names).
        local_dist_renames: ``(legacy fragment, distributed fragment)`` renames the local layer
            spec applies to its distributed-checkpoint keys (its ``sharded_state_dict_keys_map``
            maps ``input_layernorm.`` to TE's ``self_attention.linear_qkv.layer_norm_``).
        mla: multi-head latent attention (its down projections are column-parallel in the local
            spec and replicated in the TE spec).
    """

    name: str
    mapping: MappingSpec
    local_dist_renames: tuple[tuple[str, str], ...] = ()
    mla: bool = False


_LOCAL_RENAMES = (
    ("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
    ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"),
)


def _spec(
    name: str,
    types: tuple[str, ...],
    rules: tuple[Rule, ...],
    keys: dict,
    derive=None,
    **extra: Any,
) -> MappingSpec:
    return MappingSpec(
        name=f"megatron-{name}",
        hf_model_types=types,
        rules=rules,
        context_keys={**_BASE_KEYS, **keys},
        ignored_hf=(("lm_head.weight", "tie_word_embeddings"), (f"{_H}.self_attn.rotary_emb.inv_freq", None)),
        derive=_with_layout(derive),
        description=f"{name} <-> Megatron-Core GPTModel",
        **extra,
    )  # fmt: skip


def _build() -> dict[str, MegatronFamily]:
    qwen2_moe_keys = {**_MOE_KEYS, "qwen_qkv_bias": ("qkv_bias", True)}
    ds_keys = {
        "num_experts": ("n_routed_experts", 0),
        "first_k_dense_replace": ("first_k_dense_replace", 0),
        "q_lora_rank": ("q_lora_rank", None),
        "num_nextn_predict_layers": ("num_nextn_predict_layers", 0),
    }
    ds_layer = mla_attention() + dense_mlp("!moe_layer") + moe_mlp("shared_experts", False, True)
    ds_extra = {
        "hf_copies": MTP_COPIES,
        "presence_probes": (("mtp_in_checkpoint", ".eh_proj.weight"),),
    }
    specs = {
        "llama": _spec("llama", ("llama",), EMBEDDING + gqa_attention("attention_bias", False) + dense_mlp() + HEAD, {"attention_bias": ("attention_bias", False)}),
        "qwen2": _spec("qwen2", ("qwen2",), EMBEDDING + gqa_attention("", False) + dense_mlp() + HEAD, {}),
        "qwen3": _spec("qwen3", ("qwen3",), EMBEDDING + gqa_attention("attention_bias", True) + dense_mlp() + HEAD, {"attention_bias": ("attention_bias", False)}),
        "qwen3_moe": _spec("qwen3_moe", ("qwen3_moe",), EMBEDDING + gqa_attention("attention_bias", True) + dense_mlp("!moe_layer") + moe_mlp(None, False, False) + HEAD, {**_MOE_KEYS, "attention_bias": ("attention_bias", False)}, moe_layers),
        "qwen2_moe": _spec("qwen2_moe", ("qwen2_moe",), EMBEDDING + gqa_attention("qwen_qkv_bias", False) + dense_mlp("!moe_layer") + moe_mlp("shared_expert", True, False) + HEAD, qwen2_moe_keys, moe_layers),
        "deepseek_v3": _spec("deepseek_v3", ("deepseek_v3",), EMBEDDING + ds_layer + mtp_layers(ds_layer) + HEAD, ds_keys, _deepseek_derive, **ds_extra),
    }  # fmt: skip
    # The vision-language families: Megatron-Core LLaVAModel (see vlm_families).
    from forge_ckpt.megatron.vlm_families import VLM_TEXT_FAMILIES, build_vlm_mappings

    specs.update(build_vlm_mappings({t: specs[t] for t in VLM_TEXT_FAMILIES}))
    return {
        name: MegatronFamily(
            name=name,
            mapping=spec,
            local_dist_renames=() if name == "deepseek_v3" else _LOCAL_RENAMES,
            mla=name == "deepseek_v3",
        )
        for name, spec in specs.items()
    }


#: Family name -> :class:`MegatronFamily` (built on first use).
MEGATRON_FAMILIES: dict[str, MegatronFamily] = {}


def list_megatron_families() -> list[str]:
    """Names of the families with a Megatron mapping, sorted."""
    if not MEGATRON_FAMILIES:
        MEGATRON_FAMILIES.update(_build())
    return sorted(MEGATRON_FAMILIES)


def get_megatron_family(name_or_config: str | Mapping[str, Any]) -> MegatronFamily:
    """The family named ``name``, or the one for a ``config.json``'s ``model_type``."""
    from forge_ckpt.megatron.vlm_families import UNSUPPORTED_VLM

    names = list_megatron_families()
    key = name_or_config if isinstance(name_or_config, str) else name_or_config.get("model_type")
    if key in UNSUPPORTED_VLM:
        raise ValueError(f"no Megatron mapping for {key}: {UNSUPPORTED_VLM[key]}")
    if isinstance(name_or_config, str):
        if name_or_config not in MEGATRON_FAMILIES:
            raise KeyError(
                f"no Megatron mapping for family {name_or_config!r}; known: {', '.join(names)}"
            )
        return MEGATRON_FAMILIES[name_or_config]
    model_type = name_or_config.get("model_type")
    for family in MEGATRON_FAMILIES.values():
        if model_type in family.mapping.hf_model_types:
            return family
    raise ValueError(
        f"no Megatron mapping reads model_type={model_type!r} (config architectures: "
        f"{name_or_config.get('architectures')}); supported model types: {names}"
    )
