"""Balancing with the vision encoder's cost: near-even ranks on an image-heavy mixture, where
balancing by token counts alone is not; the cost model calibrates from step times."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forge_data.balance import QuadraticCost, balance_step, imbalance
from forge_data.vision.cost import VisionCost
from forge_data.vision.packing import pack_vlm_samples


def _mixture(n: int, rng: np.random.Generator) -> list[dict]:
    """80% samples with 1-3 images of 64-16384 patches (4 patches per token, Qwen2-VL-like)
    and some text; 20% text-only documents with long-tailed lengths."""
    samples = []
    for _ in range(n):
        if rng.random() < 0.8:
            k = int(rng.integers(1, 4))
            patches = (np.exp(rng.uniform(np.log(64), np.log(16384), k)) // 4 * 4).astype(int)
            length = int(patches.sum() // 4 + rng.integers(20, 400))
            visual = {"encoder_seqlens": torch.from_numpy(patches)}
            samples.append({"input_ids": np.zeros(length, np.int64), "visual": visual})
        else:
            length = int(min(rng.lognormal(6.5, 1.0), 8000)) + 1
            samples.append({"input_ids": np.zeros(length, np.int64)})
    return samples


def test_encoder_aware_balancing_beats_length_only_on_an_image_heavy_mixture():
    samples = _mixture(3000, np.random.default_rng(0))
    rows, stats = pack_vlm_samples(samples, seq_len=8192, window=16)
    assert stats.padding_waste < 0.05
    rows = [[samples[i] for i in r] for r in rows]
    cost = VisionCost()
    true = cost.sample_row_costs(rows)
    by_length = QuadraticCost().row_costs(
        np.array([len(s["input_ids"]) for r in rows for s in r]),
        np.repeat(np.arange(len(rows)), [len(r) for r in rows]),
        len(rows),
    )
    assert not np.allclose(true, by_length)
    dp, micro, per_micro = 8, 2, 2
    step = dp * micro * per_micro
    aware, blind = [], []
    for s in range(len(rows) // step):
        idx = np.arange(s * step, (s + 1) * step)
        for costs, out in ((true[idx], aware), (by_length[idx], blind)):
            layout, _ = balance_step(costs, dp_size=dp, micro_batches=micro)
            out.append(imbalance(true[idx][layout.reshape(dp, -1)].sum(axis=1)))
    aware, blind = np.array(aware), np.array(blind)
    assert len(aware) >= 10
    assert aware.mean() < 1.01
    assert aware.max() < 1.03
    assert blind.mean() > 1.04
    assert (aware <= blind + 1e-12).all()


def test_samples_move_between_ranks_rows_with_their_encoder_cost():
    from forge_data.document_balance import balance_step_documents

    samples = _mixture(1200, np.random.default_rng(2))
    rows, _ = pack_vlm_samples(samples, seq_len=8192, window=16)
    cost = VisionCost()
    dp, micro, per_micro = 32, 2, 1
    n_rows = dp * micro * per_micro
    rows = rows[:n_rows]
    flat = [samples[i] for r in rows for i in r]
    piece_row = np.repeat(np.arange(n_rows), [len(r) for r in rows])
    piece_cost = cost.sample_costs(flat)
    row_costs = cost.sample_row_costs([[samples[i] for i in r] for r in rows])
    np.testing.assert_allclose(np.bincount(piece_row, weights=piece_cost), row_costs)
    lengths = np.array([len(s["input_ids"]) for s in flat])
    _, rows_only = balance_step(row_costs, dp_size=dp, micro_batches=micro)
    new_row, layout, report = balance_step_documents(
        piece_row,
        lengths,
        piece_cost,
        n_rows=n_rows,
        seq_len=8192,
        dp_size=dp,
        micro_batches=micro,
    )
    assert rows_only.balanced > 1.025  # two rows per rank: whole rows leave a gap
    assert report.balanced < 1.02  # moving samples closes most of it
    assert np.bincount(new_row, weights=lengths, minlength=n_rows).max() <= 8192
    loads = np.bincount(new_row, weights=piece_cost, minlength=n_rows)[layout].sum(axis=(1, 2))
    assert report.balanced == pytest.approx(imbalance(loads))


@pytest.mark.parametrize("window", [None, 64])
def test_fit_recovers_the_coefficients(window):
    rng = np.random.default_rng(1)
    true = VisionCost(
        llm=QuadraticCost(a=2e-3, b=4e-7, c=0.05),
        a=3e-4,
        b=2e-8 if window is None else 1e-6,
        c=0.01,
        window=window,
        full_attention_fraction=0.0 if window is None else 0.125,
    )
    lengths = [rng.integers(50, 6000, rng.integers(1, 8)) for _ in range(40)]
    seqlens = [rng.integers(16, 16384, rng.integers(0, 6)) for _ in range(40)]
    times = [
        true.llm.doc_costs(n).sum() + true.encoder_costs(p).sum()
        for n, p in zip(lengths, seqlens, strict=True)
    ]
    fit = VisionCost.fit(
        lengths, seqlens, times, window=window, full_attention_fraction=true.full_attention_fraction
    )
    for got, want in [
        (fit.llm.a, true.llm.a),
        (fit.llm.b, true.llm.b),
        (fit.llm.c, true.llm.c),
        (fit.a, true.a),
        (fit.b, true.b),
        (fit.c, true.c),
    ]:
        assert got == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="needs >= 6 measured steps"):
        VisionCost.fit(lengths[:3], seqlens[:3], times[:3])


def test_windowed_attention_grows_linearly():
    full, windowed = VisionCost(a=0.0, b=1.0), VisionCost(a=0.0, b=1.0, window=64)
    assert full.encoder_costs(np.array([1000, 2000])).tolist() == [1e6, 4e6]
    assert windowed.encoder_costs(np.array([1000, 2000])).tolist() == [64e3, 128e3]
    assert windowed.encoder_costs(np.array([10])).tolist() == [100.0]  # shorter than a window
    with pytest.raises(ValueError, match="window must be"):
        VisionCost(window=0)
