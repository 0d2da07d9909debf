"""Weighted mixtures: shares follow the weights at every prefix, reproducibly."""

from __future__ import annotations

import numpy as np
import pytest

from forge_data.indexed import IndexedDatasetWriter
from forge_data.loader import LoaderConfig, PackedLoader, TokenDataset
from forge_data.mixture import MixtureDataset, blend_schedule


def test_schedule_tracks_weights_and_is_reproducible():
    sizes, weights = [10, 3, 50], [5, 3, 2]
    which, index = blend_schedule(sizes, weights, 200, seed=1)
    share = np.array(weights) / 10
    for n in (1, 7, 50, 200):
        counts = np.bincount(which[:n], minlength=3)
        assert np.abs(counts - share * n).max() <= 1
    # The 3-document dataset is drawn 60 times: 20 full passes, each a permutation.
    small = index[which == 1]
    assert all(sorted(small[i : i + 3]) == [0, 1, 2] for i in range(0, 60, 3))
    big = index[which == 2]
    assert big.size == 40
    assert np.unique(big).size == 40
    again = blend_schedule(sizes, weights, 200, seed=1)
    assert np.array_equal(again[0], which)
    assert np.array_equal(again[1], index)
    assert not np.array_equal(blend_schedule(sizes, weights, 200, seed=2)[1], index)
    with pytest.raises(ValueError, match="3 datasets, 2 weights"):
        blend_schedule(sizes, [1, 1], 10)
    with pytest.raises(ValueError, match="empty but weighted"):
        blend_schedule([0, 4], [1, 1], 10)


def test_mixture_feeds_the_packed_loader(tmp_path):
    sources = []
    for s, (n, base) in enumerate([(5, 100), (7, 200)]):
        with IndexedDatasetWriter(tmp_path / f"s{s}", dtype=np.uint16) as w:
            for d in range(n):
                w.add(np.full(3 + d, base + d))
        sources.append(TokenDataset([tmp_path / f"s{s}"]))
    mix = MixtureDataset(sources, [0.25, 0.75], num_documents=16, seed=0)
    assert np.bincount(mix.which).tolist() == [4, 12]
    loader = PackedLoader(mix, LoaderConfig(seq_len=32, global_batch_rows=2), dp_rank=0, dp_size=1)
    for micro in next(loader):
        for _row, _, doc, start, length in micro["pieces"].tolist():
            ids, _ = mix.document(doc)
            source = 100 if mix.which[doc] == 0 else 200
            assert (ids == source + mix.index[doc]).all()
            assert start == 0
            assert length == ids.size
