"""DeepSeek-V3 beyond transformers parity: multi-token prediction against a hand-written
reference of the paper's equations, the aux-loss-free bias update, the size table against the
published parameter counts, meta-device construction, init, FLOPs by hand, the parallel plan and
config validation."""

from __future__ import annotations

import dataclasses
import fnmatch
import re

import pytest
import torch
import torch.nn.functional as F

import forge_models
from forge_models import (
    STYLES,
    MLAConfig,
    MoEConfig,
    active_params,
    build_model,
    count_params,
    flops_per_token,
    get_config,
    get_family,
    shift_labels,
)

RTOL = 1e-5


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("FORGE_KERNELS_IMPL", "reference")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _tiny(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("deepseek-v3-debug", vocab_size=97, num_layers=2, **overrides)
    with torch.no_grad():  # informative norms and selection bias
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
        for block in model.moe_blocks().values():
            block.expert_bias.copy_(0.05 * torch.randn_like(block.expert_bias))
    return model


# --------------------------------------------------------------------------------------------
# Multi-token prediction (DeepSeek-V3 section 2.2)
# --------------------------------------------------------------------------------------------


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _mtp_reference(model, ids: torch.Tensor) -> torch.Tensor:
    """Eqs. 21-25 written out on one unpadded batch: at depth k the sequence is cut to its first
    T - k positions (TRM_k is causal), token i combines h^{k-1}_i with Emb(t_{i+k}) and predicts
    t_{i+k+1}; L = L_main + lambda / D * sum_k CE_k."""
    c = model.config
    captured = {}
    hook = model.layers[-1].register_forward_hook(
        lambda m, i, o: captured.__setitem__("h", o[0] if isinstance(o, tuple) else o)
    )
    try:
        logits = model(ids)  # main model; h^0 = last layer output before the final norm
    finally:
        hook.remove()
    T = ids.shape[1]
    main = F.cross_entropy(logits[:, :-1].reshape(-1, c.vocab_size), ids[:, 1:].reshape(-1))
    h = captured["h"]
    emb = model.embed_tokens.weight
    head = model.lm_head.weight
    depth_losses = []
    for k, module in enumerate(model.mtp, start=1):
        h = h[:, : T - k]  # positions whose next-k token exists
        e = emb[ids[:, k:]]  # Emb(t_{i+k})
        cat = torch.cat(
            (
                _rms(e, module.enorm.weight, c.rms_norm_eps),
                _rms(h, module.hnorm.weight, c.rms_norm_eps),
            ),
            dim=-1,
        )
        h_in = cat @ module.eh_proj.weight.T  # M_k
        inputs = model._prepare(ids[:, : T - k], None, None, None, None)[1]
        out = module.block(h_in, inputs)
        h = out[0] if isinstance(out, tuple) else out
        logits_k = _rms(h, module.norm.weight, c.rms_norm_eps) @ head.T
        # position i predicts t_{i+k+1}: valid for i < T - k - 1
        depth_losses.append(
            F.cross_entropy(logits_k[:, :-1].reshape(-1, c.vocab_size), ids[:, k + 1 :].reshape(-1))
        )
    return main + c.mtp_loss_weight / len(depth_losses) * sum(depth_losses), depth_losses


def test_mtp_loss_matches_the_equations_and_trains_every_module():
    model = _tiny(mtp_depth=2)
    assert len(model.mtp) == 2
    assert model.mtp[0].block.is_moe
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    loss = model(ids, labels=ids)
    depths = model.mtp_losses
    assert len(depths) == 2
    assert model.moe_stats.layers == (1, 2, 3)  # the main MoE layer, then the MTP blocks
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(ours[n].norm() > 0 for n in ours if n.startswith("mtp.")), "an MTP weight untrained"
    model.zero_grad()
    ref, ref_depths = _mtp_reference(model, ids)
    assert _rel(loss, ref) <= RTOL
    for got, want in zip(depths, ref_depths, strict=True):
        assert _rel(got, want) <= RTOL
    ref.backward()
    for name, p in model.named_parameters():
        assert _rel(ours[name], p.grad) <= RTOL, name
    # Without labels the MTP modules do not run: logits of the main model only.
    assert model(ids).shape == (2, 10, 97)
    # ... unless their logits are asked for (a loss computed outside, e.g. tensor parallel):
    # depth k's logits against the targets shifted k + 1 times give the same losses.
    logits, depth_logits = model(ids, output_mtp_logits=True)
    assert model.moe_stats.layers == (1, 2, 3)
    assert len(depth_logits) == 2
    assert torch.equal(logits, model(ids))
    targets = shift_labels(ids)
    for got, want in zip(depth_logits, depths, strict=True):
        targets = shift_labels(targets)
        assert _rel(F.cross_entropy(got.reshape(-1, 97), targets.reshape(-1)), want) <= RTOL


def test_mtp_packed_equals_documents_run_separately():
    model = _tiny(mtp_depth=2)
    lengths = [5, 3, 7]
    docs = [torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(i))
            for i, n in enumerate(lengths)]  # fmt: skip
    separate = sum(model(d, labels=d, loss_reduction="sum") for d in docs)
    cu_seqlens = torch.tensor([0, 5, 8, 15])
    packed_ids = torch.cat(docs, dim=1)
    packed = model(packed_ids, cu_seqlens=cu_seqlens, labels=packed_ids, loss_reduction="sum")
    assert _rel(packed, separate) <= RTOL
    # A 3-token document has no target at depth 2: that depth adds 0, not NaN.
    loss = model(docs[1], labels=docs[1])
    assert model.mtp_losses[1] == 0
    assert loss.isfinite()


def test_mtp_inputs_of_the_whole_row_equal_the_local_shift():
    """``mtp_inputs`` (a context-parallel shard's depth inputs, cut from the whole row) give
    the labels path's loss, per-depth losses and gradients bit for bit on an unsharded row;
    the local shift of a shard would be wrong at its last positions."""
    from forge_models.causal_lm import mtp_depth_inputs

    model = _tiny(mtp_depth=2)
    ids = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(3))
    cu_seqlens = torch.tensor([0, 6, 7, 16])
    packed = {"cu_seqlens": cu_seqlens, "loss_reduction": "sum"}
    loss = model(ids, labels=ids, **packed)
    depths = model.mtp_losses
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    targets = shift_labels(ids, cu_seqlens=cu_seqlens)
    depth_inputs = mtp_depth_inputs(ids, targets, 2, cu_seqlens=cu_seqlens)
    assert torch.equal(depth_inputs[0][0][0, :15], ids[0, 1:])  # depth 1 embeds t_{i+1}
    depth_2_targets = shift_labels(
        shift_labels(targets, cu_seqlens=cu_seqlens), cu_seqlens=cu_seqlens
    )
    assert torch.equal(depth_inputs[1][1], depth_2_targets)  # t_{i+3}, within the documents
    pre = model(ids, targets=targets, mtp_inputs=depth_inputs, **packed)
    assert torch.equal(pre, loss)
    assert all(torch.equal(a, b) for a, b in zip(model.mtp_losses, depths, strict=True))
    pre.backward()
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name]), name
    # Logits only: the depth ids alone (no targets) give the local shift's logits.
    logits_only = [(depth_ids, None) for depth_ids, _ in depth_inputs]
    with torch.no_grad():
        want = model(ids, cu_seqlens=cu_seqlens, output_mtp_logits=True)[1]
        got = model(ids, cu_seqlens=cu_seqlens, output_mtp_logits=True, mtp_inputs=logits_only)[1]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    # A shard (the first 8 positions) shifted by itself misses the next shard's tokens.
    local_ids, _ = mtp_depth_inputs(ids[:, :8], targets[:, :8], 2)[0]
    assert torch.equal(local_ids[:, :7], depth_inputs[0][0][:, :7])
    assert local_ids[0, 7] == 0
    assert depth_inputs[0][0][0, 7] == ids[0, 8] != 0

    with pytest.raises(ValueError, match=r"mtp_inputs has 1 .* mtp_depth=2"):
        model(ids, targets=targets, mtp_inputs=depth_inputs[:1])
    with pytest.raises(ValueError, match="depth 2 has no targets"):
        model(ids, targets=targets, mtp_inputs=[depth_inputs[0], logits_only[1]])
    with pytest.raises(ValueError, match="depth 1: ids must have the shape"):
        model(ids, targets=targets, mtp_inputs=[(ids[:, :8], targets), depth_inputs[1]])
    with pytest.raises(ValueError, match="pass labels instead, or mtp_inputs"):
        model(ids, targets=targets)


def test_main_loss_is_the_next_token_cross_entropy_bit_for_bit():
    """``main_loss`` is the next-token cross-entropy the forward computed: bit for bit the loss
    of the same weights without the MTP modules and the MoE auxiliary loss, for either
    reduction (a trainer reading it reports the plain cross-entropy exactly, where the
    objective less the weighted depths matches only up to rounding). The returned loss stays
    the objective; a forward without labels clears it."""
    model = _tiny(mtp_depth=2)
    plain = build_model("deepseek-v3-debug", vocab_size=97, num_layers=2, mtp_depth=0)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    assert unexpected
    assert all(k.startswith("mtp.") for k in unexpected)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(4))
    c = model.config
    for reduction in ("mean", "sum"):
        loss = model(ids, labels=ids, loss_reduction=reduction, output_router_logits=True)
        want = plain(ids, labels=ids, loss_reduction=reduction, output_router_logits=False)
        assert torch.equal(model.main_loss, want), (reduction, model.main_loss, want)
        assert not model.main_loss.requires_grad
        assert model.main_loss.dtype == torch.float32
        aux = model.moe_stats.aux_loss
        assert aux is not None
        assert aux > 0
        objective = model.main_loss + c.mtp_loss_weight / 2 * sum(model.mtp_losses)
        assert torch.equal(loss.detach(), objective + c.moe.router_aux_loss_coef * aux)
    model(ids)
    assert model.main_loss is None
    assert model.mtp_losses is None


# --------------------------------------------------------------------------------------------
# Aux-loss-free balancing
# --------------------------------------------------------------------------------------------


def test_update_expert_bias_follows_the_rule_and_steers_routing():
    model = _tiny()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    model(ids)
    stats = model.moe_stats
    blocks = model.moe_blocks()
    before = {i: blocks[i].expert_bias.clone() for i in stats.layers}
    gamma = model.config.moe.bias_update_speed
    model.update_expert_bias()  # the last forward's load
    for row, i in zip(stats.tokens_per_expert, stats.layers, strict=True):
        load = row.double()
        expected = before[i].double() + gamma * torch.sign(load.mean() - load)
        assert torch.allclose(blocks[i].expert_bias.double(), expected, atol=1e-7)
    # An explicit global-batch load, e.g. summed over micro-batches and data-parallel ranks.
    load = torch.zeros(len(stats.layers), 8, dtype=torch.long)
    load[:, 0] = 100
    model.update_expert_bias(load, update_rate=0.5)
    assert all(blocks[i].expert_bias[0] < before[i][0] for i in stats.layers)
    # The bias steers the choice: a large bias on expert 5 puts it in every token's top-k
    # (its group is then among the best), while the routing weights stay unbiased.
    for block in blocks.values():
        block.expert_bias.zero_()
        block.expert_bias[5] = 10.0
    model(ids)
    assert (model.moe_stats.tokens_per_expert[:, 5] == 32).all()
    with pytest.raises(ValueError, match=r"\[layers, num_experts\]"):
        model.update_expert_bias(torch.zeros(3, 8))
    with pytest.raises(ValueError, match="expert_bias=True"):
        build_model("qwen3-moe-debug", device="meta").update_expert_bias(torch.zeros(2, 8))


def test_expert_bias_is_a_float32_buffer_whatever_the_dtype():
    model = build_model("deepseek-v3-debug", dtype=torch.bfloat16)
    block = model.moe_blocks()[1]
    assert block.expert_bias.dtype == torch.float32
    assert "layers.1.mlp.expert_bias" in model.state_dict()
    assert "layers.1.mlp.expert_bias" not in dict(model.named_parameters())
    assert not block.expert_bias.any()


# --------------------------------------------------------------------------------------------
# Size table, construction, init, FLOPs, plan, configs
# --------------------------------------------------------------------------------------------


def test_size_table_matches_the_published_parameter_counts():
    v3 = get_config("deepseek-v3-671b")
    # 671B total, 37B activated (technical report, section 1 and 4.2); DeepSeek counts the
    # activated parameters without the input embedding.
    assert count_params(v3) == 671_026_404_352
    assert 36.5e9 < active_params(v3, embedding=False) < 37.5e9
    # The released checkpoint (685B on the Hub, which also counts its ~0.04B FP8 block-scale
    # tensors): + the MTP module (14B) with its own copies of the embedding and the head.
    with_mtp = count_params(v3.replace(mtp_depth=1)) + 2 * v3.vocab_size * v3.hidden_size
    assert round(with_mtp / 1e8) == 6845
    lite = get_config("deepseek-v2-lite")  # 15.7B total, 2.4B activated
    assert round(count_params(lite) / 1e8) == 157
    assert 2.4e9 <= active_params(lite, embedding=False) < 2.5e9
    # Meta construction allocates nothing and builds exactly the counted parameters.
    model = build_model("deepseek-v3-671b", device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == count_params(v3)
    layer = model.layers[3]
    assert layer.mlp.experts.gate_up_proj.shape == (256, 4096, 7168)
    assert layer.attn.kv_b_proj.weight.shape == (128 * 256, 512)
    assert not model.layers[2].is_moe
    assert layer.is_moe


def test_init_matches_transformers_defaults():
    import transformers

    config = get_config("deepseek-v3-debug", num_layers=2, mtp_depth=0)
    hf = transformers.DeepseekV3Config(**get_family("deepseek_v3").config_to_hf(config))
    torch.manual_seed(0)
    ref_model = transformers.DeepseekV3ForCausalLM(hf)
    ref = dict(ref_model.named_parameters())
    ref_buffers = dict(ref_model.named_buffers())
    model = build_model(config)
    from forge_ckpt import get_mapping

    spec = get_mapping("deepseek_v3")
    ctx = spec.context(get_family("deepseek_v3").config_to_hf(config), stacked_experts=True)
    ours = dict(spec.forge_to_hf(model.state_dict().items(), ctx))
    for name, t in ours.items():
        want = ref[name] if name in ref else ref_buffers[name]
        assert t.shape == want.shape, name
        if "norm" in name or "bias" in name:  # ones / zeros exactly
            assert torch.equal(t, want), name
        else:  # normal(0, initializer_range)
            assert abs(t.std().item() - want.std().item()) < 0.15 * want.std().item(), name


def test_flops_per_token_by_hand_for_deepseek_v3():
    # DeepSeek-V3: d=7168, 128 heads, q latent 1536, kv latent 512, nope 128, rope 64, v 128;
    # 3 dense layers (ffn 18432) and 58 MoE layers (router 256 experts, 8 routed + 1 shared
    # of width 2048), vocabulary 129280, sequence 4096.
    d, h = 7168, 128
    mla = d * 1536 + 1536 * h * 192 + d * (512 + 64) + 512 * h * (128 + 128) + h * 128 * d
    dense = 3 * d * 18432
    moe = d * 256 + 8 * 3 * d * 2048 + 3 * d * 2048
    n_matmul = 61 * mla + 3 * dense + 58 * moe + 129280 * d
    attention = 6 * 61 * h * (192 + 128) * 4096  # q kᵀ over 192 channels, p v over 128
    config = get_config("deepseek-v3-671b")
    assert forge_models.matmul_params(config) == n_matmul
    assert flops_per_token(config, 4096) == 6 * n_matmul + attention
    assert flops_per_token(config, 4096, causal=True) == 6 * n_matmul + attention // 2
    # One MTP module: its projection, one more MoE block and one more pass through the head.
    mtp = config.replace(mtp_depth=1)
    extra = 2 * d * d + mla + moe + 129280 * d
    assert flops_per_token(mtp, 4096) == 6 * (n_matmul + extra) + attention * 62 // 61


def test_default_plan_targets_real_modules():
    lite = get_config("deepseek-v2-lite-debug")  # with a dense MTP block (layer 2)
    lite = lite.replace(mtp_depth=1, moe=dataclasses.replace(lite.moe, mlp_only_layers=(0, 2)))
    models = [build_model("deepseek-v3-debug", device="meta"), build_model(lite, device="meta")]
    plan = models[0].parallel_plan()
    modules = {n for m in models for n, _ in m.named_modules() if n}
    for pattern, style in plan.items():
        assert style in STYLES, style
        regex = re.compile(fnmatch.translate(pattern).replace(".*", r"[^.]*"))
        assert any(regex.fullmatch(m) for m in modules), pattern
    # Every linear projection of an attention block has an entry, but the latent
    # down-projections, which the block's ``gathered_input`` runs replicated on the whole
    # sequence; the shared rotary key has its gradient reduced.
    assert plan["layers.*.attn"] == "gathered_input"
    assert plan["layers.*.attn.shared_rope_key"] == "reduce_grad"
    attn = {n.rsplit(".", 1)[-1] for m in models for n, mod in m.named_modules()
            if ".attn." in n and isinstance(mod, torch.nn.Linear)}  # fmt: skip
    styled = {p.rsplit(".", 1)[-1] for p in plan if p.startswith("layers.*.attn.")}
    assert styled | {"q_a_proj", "kv_a_proj"} >= attn


def test_hf_config_round_trip_and_validation():
    family = get_family("deepseek_v3")
    for name in ("deepseek-v3-671b", "deepseek-v2-lite", "deepseek-v2-lite-debug"):
        config = get_config(name)
        assert family.config_from_hf(family.config_to_hf(config)) == config
    config = get_config("deepseek-v3-debug")
    with pytest.raises(ValueError, match="score_func='sigmoid'"):
        family.config_to_hf(config.replace(moe=MoEConfig(num_experts=8, num_experts_per_tok=2,
                                                         moe_intermediate_size=32)))  # fmt: skip
    with pytest.raises(ValueError, match="topk_method"):
        family.config_from_hf({**family.config_to_hf(config.replace(mtp_depth=0)),
                               "topk_method": "greedy"})  # fmt: skip
    with pytest.raises(ValueError, match="head_dim is 24"):
        config.replace(head_dim=64)
    with pytest.raises(ValueError, match="positive divisor of num_experts"):
        MoEConfig(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=4, n_group=3,
                  topk_group=1)  # fmt: skip
    with pytest.raises(ValueError, match="raise topk_group"):
        MoEConfig(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=4, n_group=4,
                  topk_group=1)  # fmt: skip
    with pytest.raises(ValueError, match="qk_rope_head_dim must be even"):
        MLAConfig(q_lora_rank=None, kv_lora_rank=4, qk_nope_head_dim=4, qk_rope_head_dim=3,
                  v_head_dim=4)  # fmt: skip
