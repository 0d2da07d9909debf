"""Automatic recomputation: the chosen policy fits the budget, measured independently, and
changes no gradient."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from forge_core.testing import import_path
from forge_parallel import RecomputeConfig, apply_recompute, parallelize
from forge_parallel.auto_recompute import measure_block, plan_recompute
from forge_parallel.memory_probe import kept_for_backward

tm = import_path(Path(__file__).with_name("tiny_models.py"), "forge_parallel_tests_tiny_models")
CFG = tm.TinyConfig(dim=32, n_heads=4, n_kv_heads=2, ffn=64)


def _block_and_input():
    torch.manual_seed(0)
    return tm.Block(CFG), torch.randn(2, 32, CFG.dim, requires_grad=True)


def test_chosen_policy_fits_budget_measured_independently():
    block, x = _block_and_input()
    measurement = measure_block(block, x)
    plain = kept_for_backward(block, x)
    assert measurement.saved_bytes == plain
    extra = []
    for budget in [0, *(int(plain * f) for f in (0.3, 0.7)), plain, 100 * plain]:
        choice = plan_recompute(measurement, budget)
        checkpointed = copy.deepcopy(block)
        config = RecomputeConfig(mode="auto", memory_budget=budget)
        apply_recompute([("block", checkpointed)], config)
        held = kept_for_backward(checkpointed, x)
        assert checkpointed._forge_recompute == choice.describe()
        assert held == choice.kept_bytes, (budget, choice)
        assert held <= max(budget, measurement.input_bytes), (budget, held)
        extra.append(choice.extra_flops)
        if budget == 0:
            assert choice.kind == "full"
            assert held == measurement.input_bytes
        elif budget >= plain:
            assert choice.kind == "none"
            assert choice.extra_flops == 0
        else:
            assert choice.kind == "selective"
            assert held < plain
    # More memory never costs more recomputation; partial budgets beat full recompute.
    assert extra == sorted(extra, reverse=True)
    assert extra[0] == measurement.total_flops > extra[1]


def test_selective_keeps_the_flops_heavy_outputs():
    block, x = _block_and_input()
    measurement = measure_block(block, x)
    choice = plan_recompute(measurement, measurement.saved_bytes // 2)
    saved = {op for op, _ in choice.saved}
    # Korthikanti et al.: projections (many FLOPs per byte) kept, pointwise ops recomputed.
    assert "aten.mm.default" in saved
    assert "aten.silu.default" not in saved


def test_gradients_identical_to_no_recompute():
    reference = tm.build_tiny(dim=32, n_layers=2)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    per_block = measure_block(reference.layers[0], reference.embed(tokens)).saved_bytes
    reference(tokens).logsumexp(-1).mean().backward()
    for fraction, kind in ((0.0, "full"), (0.5, "selective"), (100.0, "none")):
        model = copy.deepcopy(reference)
        model.zero_grad()
        config = RecomputeConfig(mode="auto", memory_budget=int(per_block * fraction))
        _, summary = parallelize(model, recompute=config)
        assert summary.row("layers.0").recompute.startswith("auto")
        # The first forward measures, then runs the decided policy.
        model(tokens).logsumexp(-1).mean().backward()
        assert {layer.forward.choice.kind for layer in model.layers} == {kind}
        for (name, p), q in zip(reference.named_parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)


def test_selective_choice_under_autocast():
    """Under autocast the forward caches weight casts that the recomputation redoes: the
    selective policy must not key casts by call index (it used to fail in backward)."""
    reference = tm.build_tiny(dim=32, n_layers=2)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(5))
    per_block = measure_block(reference.layers[0], reference.embed(tokens)).saved_bytes
    model = copy.deepcopy(reference)
    parallelize(model, recompute=RecomputeConfig(mode="auto", memory_budget=per_block // 2))
    for m in (reference, model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(tokens).float().logsumexp(-1).mean()
        loss.backward()
    assert {layer.forward.choice.kind for layer in model.layers} == {"selective"}
    for (name, p), q in zip(reference.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)


def test_total_budget_is_shared_across_blocks():
    model = tm.build_tiny(dim=32, n_layers=3)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    per_block = measure_block(model.layers[0], model.embed(tokens)).saved_bytes
    total = int(per_block * 1.5)
    config = RecomputeConfig(mode="auto", memory_budget=total, budget_scope="total")
    parallelize(model, recompute=config)
    model(tokens).sum().backward()
    kept = [layer.forward.choice.kept_bytes for layer in model.layers]
    assert sum(kept) <= total
    assert [layer.forward.choice.kind for layer in model.layers] == ["selective"] * 3


def test_auto_config_errors():
    with pytest.raises(ValueError, match="needs memory_budget"):
        RecomputeConfig(mode="auto")
    with pytest.raises(ValueError, match=">= 0"):
        RecomputeConfig(mode="auto", memory_budget=-1)
    with pytest.raises(ValueError, match="used by mode='auto' only"):
        RecomputeConfig(mode="full", memory_budget=10)
    with pytest.raises(ValueError, match="budget_scope"):
        RecomputeConfig(mode="auto", memory_budget=10, budget_scope="layer")


def test_submodule_candidates_predicted_exactly():
    """Each whole-submodule candidate keeps what ``RecomputeConfig(modules=...)`` really keeps,
    and recomputes its submodules' forward FLOPs (a fraction of the block's)."""
    from forge_parallel.auto_recompute import _module_choices

    block, x = _block_and_input()
    measurement = measure_block(block, x)
    choices = {c.modules: c for c in _module_choices(measurement)}
    assert {("attn",), ("mlp",), ("attn", "mlp")} <= set(choices)
    for modules, choice in choices.items():
        checkpointed = copy.deepcopy(block)
        apply_recompute([("b", checkpointed)], RecomputeConfig(mode="selective", modules=modules))
        held = kept_for_backward(checkpointed, x)
        assert held == choice.kept_bytes, modules
        assert 0 < choice.extra_flops < measurement.total_flops
    both = choices[("attn", "mlp")]
    assert both.extra_flops == choices[("attn",)].extra_flops + choices[("mlp",)].extra_flops
    assert both.kept_bytes < min(choices[("attn",)].kept_bytes, choices[("mlp",)].kept_bytes)


def test_submodule_choice_trains_like_no_recompute():
    """A budget just under what autograd keeps: checkpointing the two norms whole recomputes
    the fewest FLOPs; the choice is in the summary, the memory and gradients are exact."""
    reference = tm.build_tiny(dim=32, n_layers=2)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    x = reference.embed(tokens)
    measurement = measure_block(reference.layers[0], x)
    budget = int(measurement.saved_bytes * 0.9)
    choice = plan_recompute(measurement, budget)
    assert choice.kind == "modules"
    assert choice.describe().startswith(f"auto: modules {','.join(choice.modules)} (")
    block = copy.deepcopy(reference.layers[0])
    apply_recompute([("b", block)], RecomputeConfig(mode="auto", memory_budget=budget))
    held = kept_for_backward(block, x.detach().requires_grad_())
    assert held == choice.kept_bytes <= budget
    reference(tokens).logsumexp(-1).mean().backward()
    model = copy.deepcopy(reference)
    model.zero_grad()
    parallelize(model, recompute=RecomputeConfig(mode="auto", memory_budget=budget))
    model(tokens).logsumexp(-1).mean().backward()
    assert {layer.forward.choice.kind for layer in model.layers} == {"modules"}
    assert model.layers[0]._forge_recompute == choice.describe()
    for (name, p), q in zip(reference.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)


def test_budget_only_full_fits_picks_full():
    block, x = _block_and_input()
    measurement = measure_block(block, x)
    choice = plan_recompute(measurement, measurement.input_bytes)
    assert choice.kind == "full"
    assert choice.kept_bytes == measurement.input_bytes
