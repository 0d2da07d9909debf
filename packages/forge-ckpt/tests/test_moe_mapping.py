"""The Qwen2-MoE / Qwen3-MoE mappings: per-layer MoE rules, per-expert stacking, round trips."""

from __future__ import annotations

import pytest
import torch

from forge_ckpt import CheckpointMismatchError
from forge_ckpt.mapping import StackExperts, get_mapping

H, I, E, V = 8, 4, 3, 11  # noqa: E741 (I: the expert width, as in the papers)


def _config(model_type: str, **kw) -> dict:
    return {
        "model_type": model_type, "num_hidden_layers": 3, "vocab_size": V, "hidden_size": H,
        "num_experts": E, "moe_intermediate_size": I, "intermediate_size": 6,
        "shared_expert_intermediate_size": 5, **kw,
    }  # fmt: skip


def _hf_shapes(names: list[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of a tiny per-expert checkpoint (what transformers' save_pretrained writes)."""
    shapes = {}
    for n in names:
        if ".experts." in n and n.endswith("down_proj.weight"):
            shapes[n] = (H, I)
        elif ".experts." in n:
            shapes[n] = (I, H)
        elif "shared_expert_gate" in n:
            shapes[n] = (1, H)
        elif "shared_expert." in n:
            shapes[n] = (H, 5) if "down" in n else (5, H)
        elif n.endswith("mlp.gate.weight"):
            shapes[n] = (E, H)
        elif "mlp." in n:
            shapes[n] = (H, 6) if "down" in n else (6, H)
        elif "embed" in n or "lm_head" in n:
            shapes[n] = (V, H)
        elif n.endswith("bias"):
            shapes[n] = (H,)
        elif "proj" in n:
            shapes[n] = (H, H)
        else:
            shapes[n] = (H,)
    return shapes


@pytest.mark.parametrize(
    ("mapping", "config", "moe_layers"),
    [
        ("qwen3_moe", _config("qwen3_moe"), {0, 1, 2}),
        ("qwen3_moe", _config("qwen3_moe", mlp_only_layers=[1]), {0, 2}),
        ("qwen2_moe", _config("qwen2_moe", decoder_sparse_step=2), {1}),
        (
            "qwen3_moe",
            {**_config("qwen3_moe", num_experts=None), "num_local_experts": E},
            {0, 1, 2},
        ),
    ],
)
def test_round_trip_is_bit_exact(mapping, config, moe_layers):
    spec = get_mapping(mapping)
    ctx = spec.context(config)
    assert ctx["moe_layer"] == moe_layers
    assert ctx["num_experts"] == E
    shapes = _hf_shapes(spec.hf_names(ctx))
    spec.check_hf(shapes, ctx)
    gen = torch.Generator().manual_seed(0)
    hf = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    forge = dict(spec.hf_to_forge(hf.items(), ctx))
    for i in range(3):
        assert (f"layers.{i}.mlp.router.weight" in forge) == (i in moe_layers)
        assert (f"layers.{i}.mlp.gate_up_proj.weight" in forge) == (i not in moe_layers)
        assert (f"layers.{i}.mlp.shared_expert_gate.weight" in forge) == (
            i in moe_layers and mapping == "qwen2_moe"
        )
    i = min(moe_layers)
    gate_up = forge[f"layers.{i}.mlp.experts.gate_up_proj"]
    assert gate_up.shape == (E, 2 * I, H)
    assert torch.equal(gate_up[1, :I], hf[f"model.layers.{i}.mlp.experts.1.gate_proj.weight"])
    assert torch.equal(gate_up[1, I:], hf[f"model.layers.{i}.mlp.experts.1.up_proj.weight"])
    down = forge[f"layers.{i}.mlp.experts.down_proj"]
    assert down.shape == (E, H, I)
    assert torch.equal(down[2], hf[f"model.layers.{i}.mlp.experts.2.down_proj.weight"])
    back = dict(spec.forge_to_hf(forge.items(), ctx))
    assert sorted(back) == sorted(hf)
    assert all(torch.equal(back[n], t) for n, t in hf.items())

    # The stacked layout (transformers 5.x module names) is detected and maps one to one.
    stacked = dict(spec.forge_to_hf(forge.items(), {**ctx, "stacked_experts": True}))
    assert stacked[f"model.layers.{i}.mlp.experts.gate_up_proj"].shape == (E, 2 * I, H)
    options = spec.detect_layout(stacked)
    assert options == {"stacked_experts": True}
    sctx = spec.context(config, **options)
    spec.check_hf({n: tuple(t.shape) for n, t in stacked.items()}, sctx)
    again = dict(spec.hf_to_forge(stacked.items(), sctx))
    assert all(torch.equal(again[n], t) for n, t in forge.items())


def test_check_hf_reports_missing_expert():
    spec = get_mapping("qwen3_moe")
    ctx = spec.context(_config("qwen3_moe"))
    shapes = _hf_shapes(spec.hf_names(ctx))
    del shapes["model.layers.2.mlp.experts.1.up_proj.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"experts\.1\.up_proj"):
        spec.check_hf(shapes, ctx)


def test_stack_experts_shapes_and_describe():
    stack = StackExperts(groups=2, dim=1)
    assert stack.joined_shape([(I, H)] * (2 * E), {}) == (E, 2 * I, H)
    with pytest.raises(ValueError, match="different shapes"):
        stack.joined_shape([(I, H), (I, H + 1)], {})
    spec = get_mapping("qwen2_moe")
    text = spec.describe(spec.context(_config("qwen2_moe")))
    assert "stack_experts(groups=2, dim=1)" in text
