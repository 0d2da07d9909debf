"""The DeepSeek-V3 mapping: MLA with and without the q latent, attention biases, dense first
layers, per-expert stacking, the selection bias and shared experts; bit-exact round trips."""

from __future__ import annotations

import pytest
import torch

from forge_ckpt import CheckpointMismatchError
from forge_ckpt.mapping import get_mapping, mapping_for_hf_config

H, I, E, V = 8, 4, 3, 11  # noqa: E741 (I: the expert width, as in the paper)
HEADS, NOPE, ROPE, VD, KV, QL = 2, 4, 2, 3, 5, 6


def _config(**kw) -> dict:
    return {
        "model_type": "deepseek_v3", "num_hidden_layers": 3, "vocab_size": V, "hidden_size": H,
        "n_routed_experts": E, "moe_intermediate_size": I, "intermediate_size": 7,
        "n_shared_experts": 1, "first_k_dense_replace": 1, "q_lora_rank": QL,
        "kv_lora_rank": KV, "num_attention_heads": HEADS, "qk_nope_head_dim": NOPE,
        "qk_rope_head_dim": ROPE, "v_head_dim": VD, "attention_bias": False, **kw,
    }  # fmt: skip


def _shape(name: str, shared: int) -> tuple[int, ...]:
    """The shape of a checkpoint tensor of the tiny config (transformers' layout)."""
    qk = HEADS * (NOPE + ROPE)
    table = {
        "q_proj.weight": (qk, H), "q_a_proj.weight": (QL, H), "q_a_proj.bias": (QL,),
        "q_a_layernorm.weight": (QL,), "q_b_proj.weight": (qk, QL),
        "kv_a_proj_with_mqa.weight": (KV + ROPE, H), "kv_a_proj_with_mqa.bias": (KV + ROPE,),
        "kv_a_layernorm.weight": (KV,), "kv_b_proj.weight": (HEADS * (NOPE + VD), KV),
        "o_proj.weight": (H, HEADS * VD), "o_proj.bias": (H,),
        "gate.weight": (E, H), "e_score_correction_bias": (E,),
    }  # fmt: skip
    for suffix, shape in table.items():
        if name.endswith(suffix) and ("self_attn" in name or "mlp.gate." in name):
            return shape
    if ".experts." in name:
        return (H, I) if "down" in name else (I, H)
    if "shared_experts" in name:
        return (H, shared * I) if "down" in name else (shared * I, H)
    if "mlp." in name:
        return (H, 7) if "down" in name else (7, H)
    if "embed" in name or "lm_head" in name:
        return (V, H)
    return (H,)


@pytest.mark.parametrize(
    "changes",
    [{}, {"q_lora_rank": None, "attention_bias": True, "n_shared_experts": 2},
     {"first_k_dense_replace": 0, "n_shared_experts": 0}],
    ids=["qlora", "noqlora-bias-2shared", "all-moe-noshared"],
)  # fmt: skip
def test_round_trip_is_bit_exact(changes):
    config = _config(**changes)
    spec = mapping_for_hf_config(config)
    assert spec is get_mapping("deepseek_v3")
    ctx = spec.context(config)
    first_dense = config["first_k_dense_replace"]
    assert ctx["moe_layer"] == set(range(first_dense, 3))
    shared = config["n_shared_experts"]
    shapes = {n: _shape(n, shared) for n in spec.hf_names(ctx)}
    spec.check_hf(shapes, ctx)
    gen = torch.Generator().manual_seed(0)
    hf = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    forge = dict(spec.hf_to_forge(hf.items(), ctx))
    qlora = config["q_lora_rank"] is not None
    for i in range(3):
        moe = i >= first_dense
        assert (f"layers.{i}.mlp.router.weight" in forge) == moe
        assert (f"layers.{i}.mlp.expert_bias" in forge) == moe
        assert (f"layers.{i}.mlp.gate_up_proj.weight" in forge) == (not moe)
        assert (f"layers.{i}.mlp.shared_expert.gate_up_proj.weight" in forge) == (
            moe and shared > 0
        )
        assert (f"layers.{i}.attn.q_a_norm.weight" in forge) == qlora
        assert (f"layers.{i}.attn.q_proj.weight" in forge) == (not qlora)
        assert (f"layers.{i}.attn.o_proj.bias" in forge) == config["attention_bias"]
    i = 2
    assert torch.equal(
        forge[f"layers.{i}.mlp.expert_bias"],
        hf[f"model.layers.{i}.mlp.gate.e_score_correction_bias"],
    )
    gate_up = forge[f"layers.{i}.mlp.experts.gate_up_proj"]
    assert gate_up.shape == (E, 2 * I, H)
    assert torch.equal(gate_up[1, :I], hf[f"model.layers.{i}.mlp.experts.1.gate_proj.weight"])
    assert torch.equal(gate_up[1, I:], hf[f"model.layers.{i}.mlp.experts.1.up_proj.weight"])
    assert torch.equal(
        forge[f"layers.{i}.attn.kv_a_proj.weight"],
        hf[f"model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight"],
    )
    back = dict(spec.forge_to_hf(forge.items(), ctx))
    assert sorted(back) == sorted(hf)
    assert all(torch.equal(back[n], hf[n]) for n in hf)
    # The stacked layout (transformers' in-memory module names) round-trips too.
    stacked = {**ctx, "stacked_experts": True}
    as_stacked = dict(spec.forge_to_hf(forge.items(), stacked))
    assert f"model.layers.{i}.mlp.experts.gate_up_proj" in as_stacked
    assert spec.detect_layout(as_stacked) == {"stacked_experts": True}
    again = dict(spec.hf_to_forge(as_stacked.items(), stacked))
    assert all(torch.equal(again[n], forge[n]) for n in forge)


def test_checkpoint_of_another_layout_is_refused():
    config = _config()
    spec = get_mapping("deepseek_v3")
    ctx = spec.context(config)
    shapes = {n: _shape(n, 1) for n in spec.hf_names(spec.context(_config(q_lora_rank=None)))}
    with pytest.raises(CheckpointMismatchError, match="q_a_proj"):
        spec.check_hf(shapes, ctx)
    with pytest.raises(ValueError, match="n_routed_experts"):
        spec.context({k: v for k, v in config.items() if k != "n_routed_experts"})
