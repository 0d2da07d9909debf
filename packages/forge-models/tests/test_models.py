"""Registry, size table, meta-device construction, init, FLOPs, plans and input handling."""

from __future__ import annotations

import fnmatch
import os
import re

import pytest
import torch

import forge_models
from forge_ckpt import CheckpointMismatchError
from forge_models import (
    STYLES,
    TransformerConfig,
    build_model,
    count_params,
    flops_per_token,
    get_config,
    get_family,
    list_sizes,
    register_family,
    register_size,
)


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("FORGE_KERNELS_IMPL", "reference")


# --------------------------------------------------------------------------------------------
# Registry and the size table
# --------------------------------------------------------------------------------------------


def test_named_sizes_exist_for_every_family():
    sizes = list_sizes()
    for name in ("llama2-7b", "llama3-8b", "llama3.1-8b", "llama3.1-70b", "llama3.2-1b",
                 "llama3.2-3b", "qwen2.5-0.5b", "qwen2.5-7b", "qwen3-0.6b", "qwen3-8b",
                 "llama-debug", "llama3-debug", "qwen2-debug", "qwen3-debug"):  # fmt: skip
        assert name in sizes
    assert set(list_sizes("qwen3")) <= {s for s in sizes if s.startswith("qwen3")}
    assert forge_models.list_families() == [
        "deepseek_v3", "internvl", "llama", "llava_onevision", "qwen2", "qwen2_5_vl",
        "qwen2_moe", "qwen3", "qwen3_moe",
    ]  # fmt: skip


# Parameter counts of the released checkpoints (model cards: 6.74B, 8.03B, 1.24B, 0.49B,
# 7.61B, 0.6B with 0.44B non-embedding, 8.2B).
@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("llama2-7b", 6_738_415_616),
        ("llama3-8b", 8_030_261_248),
        ("llama3.2-1b", 1_235_814_400),
        ("qwen2.5-0.5b", 494_032_768),
        ("qwen2.5-7b", 7_615_616_512),
        ("qwen3-0.6b", 596_049_920),
        ("qwen3-8b", 8_190_735_360),
    ],
)
def test_parameter_counts_match_the_released_models(name, params):
    assert count_params(get_config(name)) == params


# Published totals (and activated parameters of the MoE models) on the model cards, within one
# unit of the last digit they are published with; computed from the size table's configs on the
# meta device.
# Qwen counts the input embedding among the activated parameters, DeepSeek does not.
@pytest.mark.parametrize(
    ("name", "total", "active", "active_embedding", "digits"),
    [
        ("llama3-8b", 8.03, None, True, 2),
        ("llama3-70b", 70.6, None, True, 1),
        ("llama3.1-405b", 405.9, None, True, 1),
        ("llama3.2-3b", 3.21, None, True, 2),
        ("qwen2.5-14b", 14.7, None, True, 1),
        ("qwen2.5-72b", 72.7, None, True, 1),
        ("qwen3-32b", 32.8, None, True, 1),
        ("qwen3-30b-a3b", 30.5, 3.3, True, 1),
        ("qwen3-235b-a22b", 235, 22, True, 0),
        ("qwen2-57b-a14b", 57, 14, True, 0),
        ("qwen1.5-moe-a2.7b", 14.3, 2.7, True, 1),
        ("deepseek-v3-671b", 671, 37, False, 0),
    ],
)
def test_size_table_matches_the_published_totals(name, total, active, active_embedding, digits):
    model = build_model(name, device="meta")
    params = sum(p.numel() for p in model.parameters())
    assert params == count_params(model.config)
    unit = 10.0**-digits  # cards round (Llama) or truncate (Qwen) to the last digit shown
    assert abs(params / 1e9 - total) < unit
    if active is not None:
        counted = forge_models.active_params(model.config, embedding=active_embedding)
        assert abs(counted / 1e9 - active) < unit


def test_size_table_details():
    c = get_config("llama3.1-8b")
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (32, 8, 128, 128256)
    assert c.rope_theta == 500000.0
    assert c.rope_scaling.factor == 8.0
    assert get_config("llama3.2-1b").rope_scaling.factor == 32.0
    assert get_config("llama3.2-3b").tie_word_embeddings
    assert not c.tie_word_embeddings
    q = get_config("qwen3-0.6b")
    assert (q.hidden_size, q.head_dim, q.qk_norm, q.tie_word_embeddings) == (1024, 128, True, True)
    q2 = get_config("qwen2.5-7b")
    assert (q2.attention_bias, q2.attention_out_bias, q2.vocab_size) == (True, False, 152064)
    assert get_config("llama-debug", num_layers=1).num_layers == 1
    with pytest.raises(ValueError, match="valid fields"):
        get_config("llama-debug", layers=1)
    with pytest.raises(KeyError, match="known sizes"):
        get_config("llama5-1t")


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):
        register_size("llama3-8b", get_config("llama3-8b"))
    with pytest.raises(ValueError, match="already registered"):
        register_family(get_family("qwen2"))
    register_size("test-only-tiny", get_config("llama-debug", num_layers=1))
    assert build_model("test-only-tiny", device="meta").config.num_layers == 1
    with pytest.raises(ValueError, match="already registered"):
        register_size("test-only-tiny", get_config("llama-debug"))


@pytest.mark.parametrize(
    "name", ["llama3.1-70b", "llama3.2-1b", "qwen2.5-7b", "qwen3-8b", "qwen2-debug"]
)
def test_hf_config_translation_round_trips(name):
    config = get_config(name)
    family = get_family(config.family)
    assert family.config_from_hf(family.config_to_hf(config)) == config


def test_unsupported_hf_configs_are_refused():
    family = get_family("llama")
    base = family.config_to_hf(get_config("llama-debug"))
    with pytest.raises(ValueError, match="RoPE type 'yarn'"):
        family.config_from_hf(
            {**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0, "factor": 2.0}}
        )
    with pytest.raises(ValueError, match=r"sliding-window.*layers \[1\]"):
        get_family("qwen2").config_from_hf(
            {**base, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}
        )
    with pytest.raises(ValueError, match="hidden_act"):
        family.config_from_hf({**base, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="no forge model family"):
        forge_models.family_for_hf_config({"model_type": "gpt2"})


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "qwen2_moe", "qwen3_moe"])
def test_sliding_window_flag_refused_only_with_sliding_layers(family):
    """``use_sliding_window=True`` slides only the layers transformers' config derives (Qwen2:
    ``i >= max_window_layers``): a config whose layers all use full attention loads as if the
    flag were off; one with a sliding layer is refused."""
    import transformers

    from forge_models.families._hf_config import effective_layer_types

    config_cls = {
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "qwen2_moe": transformers.Qwen2MoeConfig,
        "qwen3_moe": transformers.Qwen3MoeConfig,
    }[family]
    fam = get_family(family)
    hf = fam.config_to_hf(get_config(family.replace("_", "-") + "-debug"))
    layers = hf["num_hidden_layers"]
    for window_layers in (0, 1, layers, layers + 3):
        for use in (False, True):
            flags = {
                "use_sliding_window": use,
                "sliding_window": 4,
                "max_window_layers": window_layers,
            }
            reference = config_cls(**{**hf, **flags})
            expected = getattr(reference, "layer_types", None)
            if expected is None:  # Qwen3-MoE: one window for every layer, or none
                slides = reference.sliding_window is not None
                expected = ["sliding_attention" if slides else "full_attention"] * layers
            assert effective_layer_types({**hf, **flags}, family) == expected
            if "sliding_attention" in expected:
                with pytest.raises(ValueError, match="sliding-window"):
                    fam.config_from_hf({**hf, **flags})
            else:
                assert fam.config_from_hf({**hf, **flags}) == fam.config_from_hf(hf)


@pytest.mark.parametrize(
    "family", ["llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "deepseek_v3"]
)
def test_missing_hf_keys_read_as_transformers_defaults(family):
    """A ``config.json`` leaving out a key forge reads gets transformers' default for it (its
    config class), not one of forge's own."""
    import transformers

    from forge_models.families import deepseek_v3

    classes = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "qwen2_moe": transformers.Qwen2MoeConfig,
        "qwen3_moe": transformers.Qwen3MoeConfig,
        "deepseek_v3": transformers.DeepseekV3Config,
    }
    fam = get_family(family)
    size = {"llama": "llama3-debug", "deepseek_v3": "deepseek-v3-debug"}
    hf = fam.config_to_hf(get_config(size.get(family, family.replace("_", "-") + "-debug")))
    dropped = ["max_position_embeddings", "num_key_value_heads", "head_dim"]
    if family == "deepseek_v3":
        dropped = list(deepseek_v3.HF_DEFAULTS)
    sparse = {k: v for k, v in hf.items() if k not in dropped}
    if family != "deepseek_v3":  # heads that the default key-value heads (4 to 32) divide
        sparse["num_attention_heads"] = 32
    ours, ref = fam.config_from_hf(sparse), classes[family](**sparse)
    assert ours.max_position_embeddings == ref.max_position_embeddings
    if family != "deepseek_v3":
        assert ours.num_kv_heads == ref.num_key_value_heads
        assert ours.head_dim == (
            getattr(ref, "head_dim", None) or ref.hidden_size // ref.num_attention_heads
        )
        return
    moe, mla = ours.moe, ours.mla
    assert (moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size) == (
        ref.n_routed_experts,
        ref.num_experts_per_tok,
        ref.moe_intermediate_size,
    )
    assert moe.shared_expert_intermediate_size == ref.n_shared_experts * ref.moe_intermediate_size
    assert (moe.routed_scaling_factor, moe.n_group, moe.topk_group) == (
        ref.routed_scaling_factor,
        ref.n_group,
        ref.topk_group,
    )
    assert moe.mlp_only_layers == tuple(range(ref.first_k_dense_replace))
    assert moe.norm_topk_prob == ref.norm_topk_prob
    assert (mla.q_lora_rank, mla.kv_lora_rank, mla.v_head_dim, mla.rope_interleave) == (
        ref.q_lora_rank,
        ref.kv_lora_rank,
        ref.v_head_dim,
        ref.rope_interleave,
    )
    assert (mla.qk_nope_head_dim, mla.qk_rope_head_dim) == (
        ref.qk_nope_head_dim,
        ref.qk_rope_head_dim,
    )


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        TransformerConfig(
            vocab_size=8,
            hidden_size=16,
            intermediate_size=8,
            num_layers=1,
            num_heads=4,
            num_kv_heads=3,
        )
    with pytest.raises(ValueError, match="positive int"):
        TransformerConfig(
            vocab_size=0, hidden_size=16, intermediate_size=8, num_layers=1, num_heads=4
        )
    c = TransformerConfig(
        vocab_size=10,
        hidden_size=16,
        intermediate_size=8,
        num_layers=1,
        num_heads=4,
        vocab_pad_multiple=8,
    )
    assert (c.num_kv_heads, c.head_dim, c.padded_vocab_size) == (4, 4, 16)


# --------------------------------------------------------------------------------------------
# Construction and initialization
# --------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_meta_build_of_llama3_8b_allocates_nothing():
    rss_before = _rss_bytes()
    model = build_model("llama3-8b", device="meta", dtype=torch.bfloat16)
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(t.is_meta for t in tensors)
    assert sum(t.numel() for t in model.parameters()) == 8_030_261_248
    assert {t.dtype for t in tensors} == {torch.bfloat16}
    rss_after = _rss_bytes()
    assert rss_after - rss_before < 2**28, "a meta build must not allocate the 16 GB of weights"


def test_module_tree_and_parameter_names():
    model = build_model("qwen3-debug", device="meta")
    names = set(model.state_dict())
    for expected in ("embed_tokens.weight", "layers.1.attn_norm.weight", "layers.0.attn.q_proj.weight",
                     "layers.0.attn.q_norm.weight", "layers.0.attn.k_norm.weight", "layers.0.mlp_norm.weight",
                     "layers.0.mlp.gate_up_proj.weight", "layers.0.mlp.down_proj.weight", "norm.weight"):  # fmt: skip
        assert expected in names
    assert "lm_head.weight" not in names  # tied
    assert model.layers[0].mlp.gate_up_proj.weight.shape == (2 * 160, 64)
    assert isinstance(model.layers[0], forge_models.TransformerBlock)
    llama = build_model("llama-debug", device="meta", attention_bias=True)
    assert "lm_head.weight" in llama.state_dict()
    assert "layers.0.attn.q_proj.bias" in llama.state_dict()


def test_init_weights_matches_reference_scheme():
    torch.manual_seed(0)
    model = build_model("llama-debug", pad_token_id=3, vocab_pad_multiple=128, hidden_size=128,
                        num_heads=4, head_dim=32, attention_bias=True)  # fmt: skip
    std = model.config.initializer_range
    w = model.layers[0].mlp.gate_up_proj.weight
    assert abs(w.std().item() - std) < 0.1 * std
    assert abs(w.mean().item()) < 0.1 * std
    assert torch.equal(model.layers[0].attn_norm.weight, torch.ones(128))
    assert not model.layers[0].attn.q_proj.bias.any()
    emb = model.embed_tokens.weight
    assert emb.shape[0] == 512
    assert not emb[3].any()
    assert emb[4].any()
    model2 = build_model("llama-debug", vocab_size=500, vocab_pad_multiple=128)
    assert not model2.embed_tokens.weight[500:].any()
    assert not model2.lm_head.weight[500:].any()


def test_tied_embeddings_survive_moves_and_state_dict_round_trip():
    model = build_model("qwen2-debug", device="meta")
    model.to_empty(device="cpu")
    assert model.lm_head.weight is model.embed_tokens.weight
    model.init_weights()
    model.to(torch.float64)
    assert model.lm_head.weight is model.embed_tokens.weight
    other = build_model("qwen2-debug", dtype=torch.float64)
    other.load_state_dict(model.state_dict())  # strict: no missing lm_head.weight
    assert torch.equal(other.lm_head.weight, model.embed_tokens.weight)
    state = {**model.state_dict(), "lm_head.weight": torch.zeros_like(model.lm_head.weight)}
    other.load_state_dict(state)  # a saved alias never overrides the embedding
    assert torch.equal(other.embed_tokens.weight, model.embed_tokens.weight)


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------


def test_flops_per_token_by_hand_for_llama3_8b():
    # Llama 3 8B: L=32, d=4096, 32 query heads x 128 = 4096, 8 kv heads x 128 = 1024, ffn 14336,
    # vocab 128256, sequence 8192.
    attn_weights = 4096 * 4096 + 2 * 4096 * 1024 + 4096 * 4096  # q, k, v, o
    mlp_weights = 3 * 4096 * 14336  # gate, up, down
    n_matmul = 32 * (attn_weights + mlp_weights) + 128256 * 4096  # + output projection
    assert n_matmul == 7_504_658_432
    expected = 6 * n_matmul + 12 * 32 * 4096 * 8192
    assert expected == 57_912_852_480
    config = get_config("llama3-8b")
    assert flops_per_token(config, 8192) == expected
    assert flops_per_token(config, 8192, causal=True) == 6 * n_matmul + 6 * 32 * 4096 * 8192
    assert flops_per_token(build_model("llama3-8b", device="meta"), 8192) == expected
    # A tied output projection still costs its matmul; biases and norms are not counted.
    tied = get_config("llama3.2-1b")
    assert (
        forge_models.matmul_params(tied)
        == count_params(tied, embedding=False) - 16 * 2 * 2048 - 2048 + 128256 * 2048
    )


# --------------------------------------------------------------------------------------------
# Parallel plans as data
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama-debug", "qwen2-debug", "qwen3-debug"])
def test_default_plan_targets_real_modules(name):
    model = build_model(name, device="meta")
    plan = model.parallel_plan()
    modules = {n for n, _ in model.named_modules() if n}
    for pattern, style in plan.items():
        assert style in STYLES, style
        regex = re.compile(
            fnmatch.translate(pattern).replace(".*", r"[^.]*", 1)
            if "*" in pattern
            else re.escape(pattern)
        )
        assert any(regex.fullmatch(m) for m in modules), pattern
    assert plan["layers.*.mlp.gate_up_proj"] == "colwise_packed"
    assert plan["layers.*.attn.o_proj"] == "rowwise"
    # Per-head QK-norm weights see only a rank's heads: their gradients are summed over tp.
    qk_norm = {"replicate_partial"} if model.config.qk_norm else set()
    assert {plan.get(f"layers.*.attn.{n}") for n in ("q_norm", "k_norm")} - {None} == qk_norm
    no_sp = model.parallel_plan(sequence_parallel=False)
    assert "layers.*.attn_norm" not in no_sp
    assert "sequence_parallel" not in no_sp.values()
    plan["embed_tokens"] = "changed"  # a copy: the family's plan is untouched
    assert model.parallel_plan()["embed_tokens"] == "vocab_parallel_embedding"


# --------------------------------------------------------------------------------------------
# Forward inputs
# --------------------------------------------------------------------------------------------


def test_forward_shapes_and_loss_reduction():
    model = build_model("llama3-debug")
    ids = torch.randint(0, 512, (2, 6))
    assert model(ids).shape == (2, 6, 512)
    assert model(ids[0]).shape == (6, 512)
    mean = model(ids, labels=ids)
    total = model(ids, labels=ids, loss_reduction="sum")
    assert torch.allclose(total, mean * 2 * 5)
    labels = ids.clone()
    labels[:, 3:] = -100
    assert torch.allclose(
        model(ids, labels=labels, loss_reduction="sum") / (2 * 2), model(ids, labels=labels)
    )
    # Positions given explicitly equal the default ones; an all-ones mask changes nothing.
    assert torch.equal(model(ids, position_ids=torch.arange(6).expand(2, 6)), model(ids))
    assert torch.equal(model(ids, attention_mask=torch.ones_like(ids)), model(ids))


def test_forward_input_errors():
    model = build_model("llama-debug")
    ids = torch.randint(0, 512, (2, 6))
    cu = torch.tensor([0, 3, 6])
    with pytest.raises(ValueError, match="one row"):
        model(ids, cu_seqlens=cu)
    with pytest.raises(ValueError, match="not both"):
        model(ids[:1], cu_seqlens=cu, attention_mask=torch.ones(1, 6))
    with pytest.raises(ValueError, match="last boundary"):
        model(ids[:1], cu_seqlens=torch.tensor([0, 3, 5]))
    positions = torch.tensor([[0, 1, 2, 0, 1, 2]])
    for short_or_long in ([0, 3, 5], [0, 3, 8]):  # checked with explicit positions too
        with pytest.raises(ValueError, match="last boundary"):
            model(ids[:1], cu_seqlens=torch.tensor(short_or_long), position_ids=positions)
    model(ids[:1], cu_seqlens=cu, position_ids=positions)
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=ids[:, 1:])
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.randn(2, 6))


def test_loading_a_checkpoint_of_another_model_lists_the_differences(tmp_path):
    forge_models.save_pretrained(build_model("qwen2-debug"), tmp_path / "qwen2")
    model = build_model("llama-debug")
    with pytest.raises(CheckpointMismatchError) as info:
        forge_models.load_hf_weights(model, tmp_path / "qwen2")
    err = info.value
    assert (
        "layers.0.attn.q_proj.bias" in str(err.missing)
        or "model.layers.0.self_attn.q_proj.bias" in err.unexpected
    )
    bigger = build_model("qwen2-debug", hidden_size=128, head_dim=32)
    with pytest.raises(CheckpointMismatchError, match="mis-shaped"):
        forge_models.load_hf_weights(bigger, tmp_path / "qwen2")
