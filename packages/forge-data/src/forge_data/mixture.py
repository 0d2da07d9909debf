"""Weighted mixtures of token datasets, blended reproducibly.

:func:`blend_schedule` decides which dataset each of ``num_documents`` draws comes from with the
error-minimizing rule of Megatron-LM's ``BlendedDataset`` (Shoeybi et al. 2019): draw ``i`` goes
to the dataset whose share so far lags its weight the most, so after any prefix of draws every
dataset's count is within one of ``weight * draws``. Within a dataset, draws walk a seeded
permutation of its documents, reshuffled each time it is exhausted (small datasets are upsampled,
large ones subsampled). The schedule depends only on sizes, weights and seed.

:class:`MixtureDataset` exposes the blend with the interface of
:class:`~forge_data.loader.TokenDataset`, so :class:`~forge_data.loader.PackedLoader` packs,
balances and resumes it like any other.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

__all__ = ["MixtureDataset", "blend_schedule"]


def blend_schedule(
    sizes: Sequence[int], weights: Sequence[float], num_documents: int, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``(dataset, document)`` index arrays of length ``num_documents``."""
    sizes = np.asarray(sizes, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float64)
    if sizes.size == 0 or sizes.size != w.size:
        raise ValueError(f"need one weight per dataset: {sizes.size} datasets, {w.size} weights")
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {w.tolist()}")
    if ((sizes == 0) & (w > 0)).any():
        raise ValueError(
            f"datasets {np.flatnonzero((sizes == 0) & (w > 0)).tolist()} are empty but weighted"
        )
    if num_documents < 0:
        raise ValueError(f"num_documents must be >= 0, got {num_documents}")
    w = w / w.sum()
    which = np.empty(num_documents, dtype=np.int64)
    counts = np.zeros(w.size, dtype=np.int64)
    for i in range(num_documents):
        d = int(np.argmax(w * (i + 1) - counts))
        which[i] = d
        counts[d] += 1
    index = np.empty(num_documents, dtype=np.int64)
    for d in np.flatnonzero(counts):
        draws = np.flatnonzero(which == d)
        epochs = -(-draws.size // int(sizes[d]))
        perms = [
            np.random.default_rng([seed, int(d), e]).permutation(int(sizes[d]))
            for e in range(epochs)
        ]
        index[draws] = np.concatenate(perms)[: draws.size]
    return which, index


class MixtureDataset:
    """``num_documents`` documents drawn from ``datasets`` with ``weights`` (see module doc)."""

    def __init__(
        self, datasets: Sequence, weights: Sequence[float], *, num_documents: int, seed: int = 0
    ):
        self.datasets = list(datasets)
        self.weights = [float(x) for x in weights]
        self.seed = seed
        self.which, self.index = blend_schedule(
            [len(d) for d in self.datasets], self.weights, num_documents, seed=seed
        )
        self.lengths = np.empty(num_documents, dtype=np.int64)
        for d, ds in enumerate(self.datasets):
            sel = self.which == d
            self.lengths[sel] = np.asarray(ds.lengths)[self.index[sel]]

    def __len__(self) -> int:
        return self.which.size

    def document(self, i: int):
        return self.datasets[int(self.which[i])].document(int(self.index[i]))

    @property
    def fingerprint(self) -> dict:
        parts = [d.fingerprint for d in self.datasets]
        return {
            "documents": len(self),
            "tokens": int(self.lengths.sum()),
            "lengths_crc32": zlib.crc32(self.lengths.tobytes()),
            "sources_crc32": zlib.crc32(repr((parts, self.weights, self.seed)).encode()),
        }
