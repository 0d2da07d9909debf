"""Qwen3-MoE (transformers ``Qwen3MoeForCausalLM``) <-> forge.

The Qwen3 layout (q/k norms) with a mixture-of-experts MLP on the layers where
``(i + 1) % decoder_sparse_step == 0`` and ``i not in mlp_only_layers`` (the others keep the
dense ``mlp.{gate,up,down}_proj``)::

    layers.{i}.mlp.router.weight          <- model.layers.{i}.mlp.gate.weight  [E, H]
    layers.{i}.mlp.experts.gate_up_proj   [E, 2I, H] <- mlp.experts.{j}.gate_proj.weight [I, H]
                                                        + mlp.experts.{j}.up_proj.weight [I, H]
    layers.{i}.mlp.experts.down_proj      [E, H, I]  <- mlp.experts.{j}.down_proj.weight [H, I]

Checkpoints on the Hub and those transformers 5.x ``save_pretrained`` writes hold one tensor
per expert (the layout above, stacked by :class:`StackExperts`); a checkpoint holding the stacked
``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj`` of transformers 5.x's in-memory modules
is detected from its names (``stacked_experts``) and copied as is. Export writes the
per-expert layout unless ``stacked_experts=True`` is passed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from forge_ckpt.mapping.families.llama import (
    ATTENTION_BIAS_RULES,
    ATTN_LAYER_RULES,
    CONTEXT_KEYS,
    EMBEDDING_RULES,
    HEAD_RULES,
    IGNORED_HF,
    decoder_hf_shapes,
    dense_mlp_rules,
)
from forge_ckpt.mapping.families.qwen3 import QK_NORM_RULES
from forge_ckpt.mapping.spec import MappingSpec, Rule, StackExperts

__all__ = ["MAPPING", "MOE_CONTEXT_KEYS", "MOE_LAYOUT_PROBES", "MOE_RULES", "moe_layers"]

_L = "model.layers.{i}"
_E = f"{_L}.mlp.experts"
_PER_EXPERT = ("moe_layer", "!stacked_experts")
_STACKED = ("moe_layer", "stacked_experts")

#: Router and routed experts of the MoE layers, in both checkpoint layouts.
MOE_RULES = (
    Rule("layers.{i}.mlp.router.weight", f"{_L}.mlp.gate.weight", when="moe_layer"),
    Rule(
        "layers.{i}.mlp.experts.gate_up_proj",
        (f"{_E}.{{j}}.gate_proj.weight", f"{_E}.{{j}}.up_proj.weight"),
        concat=StackExperts(groups=2, dim=1),
        when=_PER_EXPERT,
    ),
    Rule(
        "layers.{i}.mlp.experts.down_proj",
        f"{_E}.{{j}}.down_proj.weight",
        concat=StackExperts(groups=1),
        when=_PER_EXPERT,
    ),
    Rule("layers.{i}.mlp.experts.gate_up_proj", f"{_E}.gate_up_proj", when=_STACKED),
    Rule("layers.{i}.mlp.experts.down_proj", f"{_E}.down_proj", when=_STACKED),
)

#: ``num_experts`` is derived: transformers 5.x writes Qwen3-MoE's as ``num_local_experts``.
MOE_CONTEXT_KEYS = {
    "num_experts": ("num_experts", None),
    "num_local_experts": ("num_local_experts", None),
    "decoder_sparse_step": ("decoder_sparse_step", 1),
    "mlp_only_layers": ("mlp_only_layers", ()),
}

#: A checkpoint with stacked expert tensors (transformers 5.x module names).
MOE_LAYOUT_PROBES = (("stacked_experts", ".mlp.experts.gate_up_proj"),)


def moe_layers(ctx: Mapping[str, Any]) -> dict[str, Any]:
    """``moe_layer``: the set of MoE layer indices (transformers' ``Qwen*MoeDecoderLayer`` rule);
    ``stacked_experts`` defaults to False (the per-expert layout)."""
    experts = ctx["num_experts"] if ctx["num_experts"] is not None else ctx["num_local_experts"]
    if experts is None:
        raise ValueError("config.json has neither num_experts nor num_local_experts")
    step = int(ctx["decoder_sparse_step"])
    dense = {int(i) for i in ctx["mlp_only_layers"] or ()}
    layers = frozenset(
        i
        for i in range(int(ctx["num_layers"]))
        if int(experts) > 0 and i not in dense and (i + 1) % step == 0
    )
    return {"num_experts": int(experts), "moe_layer": layers, "stacked_experts": False}


MAPPING = MappingSpec(
    name="qwen3_moe",
    hf_model_types=("qwen3_moe",),
    rules=(
        EMBEDDING_RULES
        + ATTN_LAYER_RULES
        + QK_NORM_RULES
        + ATTENTION_BIAS_RULES
        + dense_mlp_rules("!moe_layer")
        + MOE_RULES
        + HEAD_RULES
    ),
    context_keys={
        **CONTEXT_KEYS,
        **MOE_CONTEXT_KEYS,
        "attention_bias": ("attention_bias", False),
    },
    ignored_hf=IGNORED_HF,
    derive=moe_layers,
    layout_probes=MOE_LAYOUT_PROBES,
    description="Qwen3-MoE (Qwen3MoeForCausalLM)",
    hf_shapes=decoder_hf_shapes,
)
