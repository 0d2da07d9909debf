"""Load-aware balancing: a permutation of the same rows, with a lower max/mean rank cost."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from forge_data.balance import QuadraticCost, balance_step, balanced_assignment, imbalance


def _long_tailed_costs(n, seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.minimum(rng.lognormal(6.0, 1.2, n), 8192).astype(int) + 1
    return QuadraticCost(a=1.0, b=1e-3).doc_costs(lengths)


@pytest.mark.parametrize(("dp", "per_rank"), [(8, 4), (64, 8), (16, 1)])
def test_assignment_is_balanced_permutation(dp, per_rank):
    costs = _long_tailed_costs(dp * per_rank, seed=dp)
    bins = balanced_assignment(costs, dp)
    assert np.bincount(bins, minlength=dp).tolist() == [per_rank] * dp
    loads = np.bincount(bins, weights=costs, minlength=dp)
    naive = imbalance(costs.reshape(dp, per_rank).sum(axis=1))
    assert imbalance(loads) <= naive
    if per_rank >= 4:
        # Lower bound: the bin holding the heaviest row also holds per_rank - 1 other rows.
        mean = costs.sum() / dp
        best = max(costs.max() + np.sort(costs)[: per_rank - 1].sum(), mean) / mean
        assert imbalance(loads) <= max(1.05, 1.02 * best), (imbalance(loads), naive, best)
        assert naive > 1.3
    assert np.array_equal(bins, balanced_assignment(costs, dp))  # deterministic


def test_balance_step_layout_is_a_permutation_and_per_rank_matches_global():
    costs = _long_tailed_costs(4 * 3 * 2, seed=3)
    layout, report = balance_step(costs, dp_size=4, micro_batches=3)
    assert layout.shape == (4, 3, 2)
    assert sorted(layout.reshape(-1).tolist()) == list(range(costs.size))
    assert report.balanced <= report.naive
    assert report.balanced == pytest.approx(imbalance(costs[layout].sum(axis=(1, 2))))
    for r in range(4):
        mine, _ = balance_step(costs, dp_size=4, micro_batches=3, rank=r)
        assert np.array_equal(mine[r], layout[r])
    with pytest.raises(ValueError, match="does not split into dp_size=5"):
        balance_step(costs, dp_size=5, micro_batches=1)


def test_cost_model_is_calibrated_from_measured_step_times():
    rng = np.random.default_rng(0)
    true = QuadraticCost(a=2e-3, b=5e-7, c=0.05)
    steps = [rng.integers(16, 4096, rng.integers(1, 12)) for _ in range(40)]
    times = [true.doc_costs(s).sum() * (1 + rng.normal(0, 1e-3)) for s in steps]
    fit = QuadraticCost.fit(steps, times)
    assert fit.a == pytest.approx(true.a, rel=0.05)
    assert fit.b == pytest.approx(true.b, rel=0.05)
    assert fit.c == pytest.approx(true.c, rel=0.2)
    # Linear-only timings: the quadratic coefficient is clipped to 0, not negative.
    lin = QuadraticCost.fit(steps, [3e-3 * s.sum() - 1e-9 * (s**2).sum() for s in steps])
    assert lin.b == 0.0
    assert lin.a > 0
    with pytest.raises(ValueError, match="needs >= 3 measured steps"):
        QuadraticCost.fit(steps[:2], times[:2])


def test_layouts_are_pinned():
    """Digests of layouts and reports computed before the loader was vectorized (2026-11-23):
    speed-ups of the balancer must not change which rank and micro-batch a row goes to."""
    h = hashlib.sha256()
    for dp, micro, per_micro, seed in [(1, 1, 8, 0), (1, 4, 2, 1), (8, 3, 2, 2), (64, 1, 4, 3)]:
        costs = _long_tailed_costs(dp * micro * per_micro, seed=seed)
        for rank in (None, dp - 1):
            layout, report = balance_step(costs, dp_size=dp, micro_batches=micro, rank=rank)
            h.update(layout.tobytes() + repr(report).encode())
        h.update(balanced_assignment(costs, 1).tobytes())
    assert h.hexdigest()[:16] == "c18f9efa344af264"
