"""Weighted mixtures: shares follow the weights at every prefix, reproducibly."""

from __future__ import annotations

import numpy as np
import pytest

from forge_data.indexed import IndexedDatasetWriter
from forge_data.loader import LoaderConfig, PackedLoader, TokenDataset, gather_pieces
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


class PerDocument:
    """A source seen only through ``document(i)``: the loader's one-call-per-piece fallback."""

    def __init__(self, dataset):
        self.dataset, self.lengths = dataset, dataset.lengths

    def __len__(self):
        return len(self.dataset)

    def document(self, i):
        return self.dataset.document(i)


def _effective(keep, n):
    return np.ones(n, bool) if keep is None else keep


def test_gather_matches_per_document_reads(tmp_path):
    rng = np.random.default_rng(3)
    sources = []
    for s in range(3):
        with IndexedDatasetWriter(tmp_path / f"s{s}", dtype=np.uint16, with_mask=s == 1) as w:
            for _ in range(6 + s):
                n = int(rng.integers(1, 30))
                w.add(rng.integers(0, 5000, n), rng.integers(0, 2, n) if s == 1 else None)
        sources.append(TokenDataset([tmp_path / f"s{s}"]))
    inner = MixtureDataset(sources[1:], [1, 1], num_documents=20, seed=1)
    mixes = {
        "spans": MixtureDataset([sources[0], inner, sources[2]], [1, 2, 3], num_documents=50),
        # A source without spans(): one gather per source, scattered back.
        "per source": MixtureDataset([sources[0], PerDocument(inner)], [1, 2], num_documents=50),
        "no masks": MixtureDataset([sources[0], sources[2]], [1, 1], num_documents=30, seed=2),
    }
    assert mixes["spans"].spans() is not None
    assert mixes["per source"].spans() is None
    for name, mix in mixes.items():
        docs = rng.integers(0, len(mix), 40)
        starts = (rng.random(40) * mix.lengths[docs]).astype(np.int64)
        lengths = (rng.random(40) * (mix.lengths[docs] - starts)).astype(np.int64)
        ids, keep = mix.gather(docs, starts, lengths)
        ref_ids, ref_keep = gather_pieces(PerDocument(mix), docs, starts, lengths)
        assert ids.dtype == np.int64, name
        np.testing.assert_array_equal(ids, ref_ids, err_msg=name)
        np.testing.assert_array_equal(
            _effective(keep, ids.size), _effective(ref_keep, ids.size), err_msg=name
        )
        assert (keep is None) == (name == "no masks"), name
        assert not _effective(keep, ids.size).all() or name == "no masks", name
