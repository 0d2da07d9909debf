"""MoE routing and balancing losses against a naive per-token implementation and transformers.

The naive implementations below loop over tokens in fp64 with Python sorting, independently of
the vectorised torch code under test; they always run. The ``transformers`` parity tests (Qwen2-MoE
and Qwen3-MoE routers, DeepSeek-V3's group-limited router with its selection bias, and
``load_balancing_loss_func``) are skipped where transformers is not installed.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from forge_kernels import registry
from forge_kernels.moe import (
    count_tokens_per_expert,
    load_balancing_loss,
    load_balancing_loss_from_logits,
    moe_topk_routing,
    moe_topk_routing_reference,
    router_z_loss,
    sequence_balance_loss,
    update_expert_bias,
)


def _gen(*params) -> torch.Generator:
    """A generator seeded per test case (``hash`` of a str differs between processes)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(params).encode()))


# --------------------------------------------------------------------------------------------
# Naive references
# --------------------------------------------------------------------------------------------


def naive_routing(
    logits, top_k, *, score_func, norm_topk_prob, scale, n_group, topk_group, bias
) -> tuple[list[list[int]], list[list[float]]]:
    """Per token, in fp64: scores, group filter, top-k of scores + bias, weights from scores."""
    num_experts = logits.shape[1]
    all_idx, all_w = [], []
    for row in logits.double():
        if score_func == "softmax":
            exps = [math.exp(v) for v in row.tolist()]
            scores = [v / sum(exps) for v in exps]
        else:
            scores = [1 / (1 + math.exp(-v)) for v in row.tolist()]
        choice = [s + (0.0 if bias is None else float(bias[e])) for e, s in enumerate(scores)]
        allowed = list(range(num_experts))
        if n_group is not None:
            size = num_experts // n_group
            group_score = [
                sum(sorted(choice[g * size : (g + 1) * size], reverse=True)[:2])
                for g in range(n_group)
            ]
            kept = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
            allowed = [e for e in allowed if e // size in kept]
        chosen = sorted(allowed, key=lambda e: -choice[e])[:top_k]
        weights = [scores[e] for e in chosen]
        if norm_topk_prob:
            weights = [w / sum(weights) for w in weights]
        all_idx.append(chosen)
        all_w.append([w * scale for w in weights])
    return all_idx, all_w


CASES = {
    # name: (tokens, experts, top_k, options)
    "qwen_softmax": (37, 6, 2, {"score_func": "softmax"}),
    "qwen_softmax_norm": (37, 6, 2, {"score_func": "softmax", "norm_topk_prob": True}),
    "sigmoid_bias_scale": (
        29,
        8,
        3,
        {"score_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5},
    ),
    "deepseek_grouped": (
        33,
        16,
        4,
        {
            "score_func": "sigmoid",
            "norm_topk_prob": True,
            "routed_scaling_factor": 2.5,
            "n_group": 4,
            "topk_group": 2,
        },
    ),
    "softmax_grouped_no_norm": (21, 12, 3, {"n_group": 3, "topk_group": 1}),
    "groups_of_one": (13, 5, 2, {"score_func": "sigmoid", "n_group": 5, "topk_group": 3}),
    "k_equals_e": (9, 4, 4, {"norm_topk_prob": True}),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_routing_matches_naive(case, with_bias):
    tokens, experts, top_k, options = CASES[case]
    gen = _gen(case, with_bias)
    logits = (2 * torch.randn(tokens, experts, generator=gen)).requires_grad_()
    bias = 0.3 * torch.randn(experts, generator=gen) if with_bias else None

    out = moe_topk_routing(logits, top_k=top_k, expert_bias=bias, **options)

    want_idx, want_w = naive_routing(
        logits.detach(),
        top_k,
        score_func=options.get("score_func", "softmax"),
        norm_topk_prob=options.get("norm_topk_prob", False),
        scale=options.get("routed_scaling_factor", 1.0),
        n_group=options.get("n_group"),
        topk_group=options.get("topk_group"),
        bias=bias,
    )
    assert out.indices.dtype == torch.int64
    assert out.indices.tolist() == want_idx  # same experts, same (descending) order
    torch.testing.assert_close(out.weights, torch.tensor(want_w, dtype=torch.float32))
    counts = torch.bincount(torch.tensor(want_idx).flatten(), minlength=experts)
    assert out.tokens_per_expert.tolist() == counts.tolist()
    assert out.scores.shape == (tokens, experts)

    # Gradient of the weights w.r.t. the logits, against autograd through the naive formula in fp64.
    g = torch.randn(tokens, top_k, generator=gen)
    (grad,) = torch.autograd.grad(out.weights, logits, g)
    l64 = logits.detach().double().requires_grad_()
    s = l64.softmax(-1) if options.get("score_func", "softmax") == "softmax" else l64.sigmoid()
    w = s.gather(1, torch.tensor(want_idx))
    if options.get("norm_topk_prob"):
        w = w / w.sum(-1, keepdim=True)
    w = w * options.get("routed_scaling_factor", 1.0)
    (want_grad,) = torch.autograd.grad(w, l64, g.double())
    torch.testing.assert_close(grad, want_grad.float(), rtol=1e-5, atol=1e-6)


def test_bias_changes_selection_but_not_weights():
    """Aux-loss-free balancing: a large bias forces an expert in; its weight is its raw score."""
    gen = _gen("bias")
    logits = torch.randn(16, 6, generator=gen)
    bias = torch.zeros(6)
    bias[5] = 100.0
    out = moe_topk_routing(logits, top_k=2, score_func="sigmoid", expert_bias=bias)
    assert (out.indices[:, 0] == 5).all()
    torch.testing.assert_close(out.weights[:, 0], logits[:, 5].sigmoid())
    assert out.tokens_per_expert[5] == 16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_logits(dtype):
    """Scores in fp32 (as Qwen-MoE's ``softmax(dtype=float)``), weights back in the logits dtype."""
    gen = _gen("lowp", dtype)
    logits = torch.randn(37, 6, generator=gen).to(dtype)
    out = moe_topk_routing(logits, top_k=2, norm_topk_prob=True)
    assert out.weights.dtype == dtype
    assert out.scores.dtype == torch.float32
    probs = logits.float().softmax(-1)
    top = probs.topk(2, dim=-1)
    assert torch.equal(out.indices, top.indices)
    torch.testing.assert_close(
        out.weights, (top.values / top.values.sum(-1, keepdim=True)).to(dtype)
    )


def test_dispatches_through_registry():
    logits = torch.randn(5, 4)
    sentinel = object()
    with registry.overridden("moe_topk_routing", lambda *a, **k: sentinel):
        assert moe_topk_routing(logits, top_k=2) is sentinel
    assert registry.get_reference("moe_topk_routing") is moe_topk_routing_reference


@pytest.mark.parametrize(
    ("shape", "kwargs", "match"),
    [
        ((5, 4), {"top_k": 5}, "top_k must be between 1 and the number of experts"),
        ((5, 4), {"top_k": 0}, "top_k must be between 1"),
        ((5, 6), {"top_k": 2, "n_group": 4, "topk_group": 2}, "divisor of the number of experts"),
        ((5, 8), {"top_k": 2, "n_group": 4, "topk_group": 5}, "topk_group must be between 1 and"),
        ((5, 8), {"top_k": 2, "n_group": 4}, "both n_group and topk_group"),
        ((5, 8), {"top_k": 5, "n_group": 4, "topk_group": 2}, "raise topk_group or lower top_k"),
        (
            (5, 8),
            {"top_k": 2, "expert_bias": torch.zeros(7)},
            r"expert_bias must have shape \(8,\)",
        ),
        ((5, 8), {"top_k": 2, "score_func": "relu"}, "score_func must be"),
        ((2, 5, 8), {"top_k": 2}, r"reshape\(-1, num_experts\)"),
    ],
)
def test_bad_arguments(shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        moe_topk_routing(torch.randn(shape), **kwargs)


def test_update_expert_bias():
    bias = torch.zeros(4)
    counts = torch.tensor([10, 2, 4, 4])  # mean 5
    out = update_expert_bias(bias, counts, update_rate=0.01)
    assert out is bias
    torch.testing.assert_close(bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    update_expert_bias(bias, torch.tensor([5, 5, 5, 5]), update_rate=0.01)  # balanced: no change
    torch.testing.assert_close(bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    with pytest.raises(ValueError, match="same shape"):
        update_expert_bias(bias, torch.tensor([1, 2]))


def test_bias_update_balances_a_skewed_router():
    """Repeated aux-loss-free updates pull a router with one favoured expert towards balance."""
    gen = _gen("balance")
    logits = torch.randn(512, 8, generator=gen)
    logits[:, 0] += 2.0
    bias = torch.zeros(8)
    first = moe_topk_routing(logits, top_k=2, score_func="sigmoid", expert_bias=bias)
    for _ in range(300):
        counts = moe_topk_routing(
            logits, top_k=2, score_func="sigmoid", expert_bias=bias
        ).tokens_per_expert
        update_expert_bias(bias, counts, update_rate=0.01)
    assert first.tokens_per_expert.max() > 400
    assert counts.max() < 1.5 * counts.float().mean()


# --------------------------------------------------------------------------------------------
# Balancing losses
# --------------------------------------------------------------------------------------------


def test_count_tokens_per_expert():
    idx = torch.tensor([[0, 3], [3, 1], [0, 3]])
    assert count_tokens_per_expert(idx, 5).tolist() == [2, 1, 0, 3, 0]


@pytest.mark.parametrize("top_k", [1, 2])
def test_load_balancing_loss_naive(top_k):
    gen = _gen("lb", top_k)
    logits = torch.randn(37, 6, generator=gen, requires_grad=True)
    routing = moe_topk_routing(logits, top_k=top_k)
    loss = load_balancing_loss(routing.scores, routing.tokens_per_expert)
    # Switch eq. 4: N * sum_i f_i P_i with f_i counting every (token, slot) assignment.
    probs = logits.detach().double().softmax(-1)
    chosen = probs.topk(top_k, dim=-1).indices
    want = sum((chosen == i).sum().item() / 37 * probs[:, i].mean().item() for i in range(6)) * 6
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(want, rel=1e-6)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.abs().sum() > 0
    # A perfectly uniform router scores top_k.
    uniform = load_balancing_loss(torch.full((12, 6), 1 / 6), torch.full((6,), 2 * top_k))
    assert uniform.item() == pytest.approx(top_k)


def test_load_balancing_loss_from_logits_naive():
    gen = _gen("lb_logits")
    layers = tuple(torch.randn(10, 5, generator=gen) for _ in range(3))
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    for attention_mask in (None, mask):
        loss = load_balancing_loss_from_logits(
            layers, num_experts=5, top_k=2, attention_mask=attention_mask
        )
        keep = torch.ones(10) if attention_mask is None else attention_mask.reshape(-1)
        counts, probs, rows = torch.zeros(5), torch.zeros(5), 0.0
        for logits in layers:
            p = logits.softmax(-1)
            for t in range(10):
                for e in p[t].topk(2).indices.tolist():
                    counts[e] += keep[t]
            probs += (p * keep[:, None]).sum(0)
            rows += keep.sum().item()
        want = 5 * (counts / rows * probs / rows).sum()
        assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    # One layer's tensor equals a one-layer tuple; the flat form matches load_balancing_loss.
    single = load_balancing_loss_from_logits(layers[0], num_experts=5, top_k=2)
    routing = moe_topk_routing(layers[0], top_k=2)
    flat = load_balancing_loss(routing.scores, routing.tokens_per_expert)
    assert single.item() == pytest.approx(flat.item(), rel=1e-6)


def test_sequence_balance_loss_naive():
    gen = _gen("seq")
    batch, seq, experts, top_k = 3, 11, 8, 2
    logits = torch.randn(batch * seq, experts, generator=gen, requires_grad=True)
    routing = moe_topk_routing(logits, top_k=top_k, score_func="sigmoid", norm_topk_prob=True)
    loss = sequence_balance_loss(
        routing.scores.view(batch, seq, experts), routing.indices.view(batch, seq, top_k)
    )
    s = logits.detach().double().sigmoid().view(batch, seq, experts)
    idx = routing.indices.view(batch, seq, top_k)
    total = 0.0
    for b in range(batch):
        for i in range(experts):
            f = experts / (top_k * seq) * sum(int(i in idx[b, t].tolist()) for t in range(seq))
            p = sum((s[b, t, i] / s[b, t].sum()).item() for t in range(seq)) / seq
            total += f * p
    assert loss.item() == pytest.approx(total / batch, rel=1e-6)
    assert torch.autograd.grad(loss, logits)[0].abs().sum() > 0
    # Perfect balance scores 1: every expert chosen equally often with equal affinities.
    idx = torch.arange(experts).view(1, 4, top_k)
    balanced = sequence_balance_loss(torch.full((1, 4, experts), 0.5), idx)
    assert balanced.item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="view"):
        sequence_balance_loss(routing.scores, routing.indices)


def test_router_z_loss_naive():
    gen = _gen("z")
    logits = torch.randn(2, 7, 5, generator=gen).to(torch.bfloat16)
    want = (
        sum(
            math.log(sum(math.exp(v) for v in row)) ** 2
            for row in logits.float().view(-1, 5).tolist()
        )
        / 14
    )
    loss = router_z_loss(logits)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(want, rel=1e-5)


# --------------------------------------------------------------------------------------------
# transformers parity (skipped without transformers)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
@pytest.mark.parametrize("norm_topk_prob", [False, True], ids=["plain", "norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_qwen_router_matches_transformers(family, norm_topk_prob, dtype):
    pytest.importorskip("transformers")
    if family == "qwen2_moe":
        from transformers import Qwen2MoeConfig as Config
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter as Router
    else:
        from transformers import Qwen3MoeConfig as Config
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter as Router

    config = Config(
        hidden_size=24, num_experts=6, num_experts_per_tok=2, norm_topk_prob=norm_topk_prob
    )
    gen = _gen(family, norm_topk_prob, dtype)
    router = Router(config).to(dtype)
    with torch.no_grad():
        router.weight.copy_(torch.randn(6, 24, generator=gen))
    hidden = torch.randn(37, 24, generator=gen).to(dtype)

    _, want_w, want_idx = router(hidden)
    out = moe_topk_routing(F.linear(hidden, router.weight), top_k=2, norm_topk_prob=norm_topk_prob)
    assert torch.equal(out.indices, want_idx)
    assert out.weights.dtype == want_w.dtype
    torch.testing.assert_close(out.weights, want_w, rtol=0, atol=0)


def _sorted_by_expert(indices, weights):
    order = indices.argsort(dim=-1)
    return indices.gather(1, order), weights.gather(1, order)


@pytest.mark.parametrize(
    ("n_group", "topk_group", "norm_topk_prob", "scale"),
    [(4, 2, True, 2.5), (1, 1, False, 1.0), (8, 3, True, 1.0)],
)
def test_deepseek_v3_router_matches_transformers(n_group, topk_group, norm_topk_prob, scale):
    pytest.importorskip("transformers")
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    config = DeepseekV3Config(
        hidden_size=24,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=norm_topk_prob,
        routed_scaling_factor=scale,
    )
    gen = _gen("deepseek", n_group, topk_group, norm_topk_prob)
    router = DeepseekV3TopkRouter(config)
    with torch.no_grad():
        router.weight.copy_(torch.randn(16, 24, generator=gen))
        router.e_score_correction_bias.copy_(0.5 * torch.randn(16, generator=gen))
    hidden = torch.randn(41, 24, generator=gen).to(torch.bfloat16)

    _, want_w, want_idx = router(hidden)
    out = moe_topk_routing(
        F.linear(hidden.float(), router.weight.float()),
        top_k=4,
        score_func="sigmoid",
        norm_topk_prob=norm_topk_prob,
        routed_scaling_factor=scale,
        n_group=n_group,
        topk_group=topk_group,
        expert_bias=router.e_score_correction_bias,
    )
    # transformers takes an unsorted top-k: compare per token sorted by expert id.
    got_idx, got_w = _sorted_by_expert(out.indices, out.weights)
    want_idx, want_w = _sorted_by_expert(want_idx, want_w)
    assert torch.equal(got_idx, want_idx)
    torch.testing.assert_close(got_w, want_w, rtol=1e-6, atol=0)


@pytest.mark.parametrize("with_mask", [False, True], ids=["no_mask", "mask"])
def test_load_balancing_loss_matches_transformers(with_mask):
    pytest.importorskip("transformers")
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    gen = _gen("lb_tf", with_mask)
    layers = tuple(torch.randn(2 * 9, 6, generator=gen) for _ in range(3))
    mask = None
    if with_mask:
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[0, 6:] = 0
    want = load_balancing_loss_func(layers, num_experts=6, top_k=2, attention_mask=mask)
    got = load_balancing_loss_from_logits(layers, num_experts=6, top_k=2, attention_mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_switch_balance_sums_add_up_over_layers_and_token_shards():
    """The per-layer sums of :func:`switch_balance_sums` add up: over layers (a pipeline's
    stages) and over shards of one batch's tokens (context / sequence parallel ranks), the
    loss from the total is ``load_balancing_loss_from_logits`` of everything, value and
    gradients, with and without a padding mask."""
    from forge_kernels.moe import (
        load_balancing_loss_from_logits,
        switch_balance_loss_from_sums,
        switch_balance_sums,
    )

    gen = torch.Generator().manual_seed(0)
    layers = [torch.randn(12, 8, generator=gen, requires_grad=True) for _ in range(3)]
    for mask in (None, (torch.rand(2, 6, generator=gen) > 0.3).long()):
        expected = load_balancing_loss_from_logits(
            layers, num_experts=8, top_k=2, attention_mask=mask
        )
        want = torch.autograd.grad(expected, layers)
        flat = None if mask is None else mask.reshape(-1)
        sums = sum(
            switch_balance_sums(logits[part], top_k=2, mask=None if flat is None else flat[part])
            for logits in layers
            for part in (slice(0, 5), slice(5, 12))  # two token shards of each layer
        )
        loss = switch_balance_loss_from_sums(sums)
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
        for got, ref in zip(torch.autograd.grad(loss, layers), want, strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
