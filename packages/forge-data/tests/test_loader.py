"""Deterministic, resumable loading: exact resume, and no sample lost or repeated when the
data-parallel size changes mid-epoch."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from forge_data.balance import QuadraticCost
from forge_data.indexed import IndexedDatasetWriter
from forge_data.loader import LoaderConfig, PackedLoader, TokenDataset
from forge_data.mixture import MixtureDataset

SEQ = 64
CONFIG = LoaderConfig(seq_len=SEQ, global_batch_rows=8, micro_batch_rows=1, seed=7)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    lengths = [*rng.integers(1, 60, 70).tolist(), 0, 150, 64]
    prefixes = []
    for s, part in enumerate(np.array_split(np.arange(len(lengths)), 2)):
        prefixes.append(folder / f"shard_{s}")
        with IndexedDatasetWriter(prefixes[-1], dtype=np.uint16) as w:
            for d in part:
                w.add((np.arange(lengths[d]) + 97 * d) % 60000)
    return TokenDataset(prefixes)


def _loaders(dataset, dp, config=CONFIG):
    return [PackedLoader(dataset, config, dp_rank=r, dp_size=dp, pad_id=0) for r in range(dp)]


def _step(loaders):
    return [next(ld) for ld in loaders]


def _pieces(step):
    """Sorted (epoch, doc, start, length) of every piece of one global step, over all ranks."""
    return sorted(tuple(p[1:]) for rank in step for micro in rank for p in micro["pieces"].tolist())


def test_batches_hold_the_documents_tokens(dataset):
    (ld,) = _loaders(dataset, 1)
    for micro in next(ld):
        offset = {}  # pieces of a row are laid out in order
        for row, _, doc, start, length in micro["pieces"].tolist():
            t = offset.get(row, 0)
            ids, _ = dataset.document(doc)
            expected = torch.as_tensor(ids[start : start + length].astype(np.int64))
            assert torch.equal(micro["input_ids"][row, t : t + length], expected)
            assert torch.equal(micro["position_ids"][row, t : t + length], torch.arange(length))
            offset[row] = t + length


def test_resume_at_same_dp_size_is_exact(dataset):
    straight = _loaders(dataset, 2)
    reference = [_step(straight) for _ in range(7)]
    first = _loaders(dataset, 2)
    for _ in range(3):
        _step(first)
    state = first[0].state_dict()
    assert all(ld.state_dict() == state for ld in first)  # every rank holds the same state
    resumed = _loaders(dataset, 2)
    for ld in resumed:
        ld.load_state_dict(state)
    for k in range(3, 7):
        got = _step(resumed)
        for rank in range(2):
            for a, b in zip(got[rank], reference[k][rank], strict=True):
                assert a.keys() == b.keys()
                assert all(torch.equal(a[key], b[key]) for key in a)
    assert resumed[0].last_report.balanced <= resumed[0].last_report.naive


def test_resume_at_other_dp_size_loses_and_repeats_nothing(dataset):
    straight = _loaders(dataset, 2)
    plan0 = straight[0].plan(0)
    steps = -(-plan0.num_rows // CONFIG.global_batch_rows) + 1  # past the end of epoch 0
    reference = [_pieces(_step(straight)) for _ in range(steps)]

    seen = []
    before = _loaders(dataset, 2)
    for _ in range(2):
        seen.append(_pieces(_step(before)))
    after = _loaders(dataset, 4)  # 4 ranks x 2 micro-batches instead of 2 x 4
    for ld in after:
        ld.load_state_dict(before[0].state_dict())
    assert after[0].micro_batches == 2
    while len(seen) < steps:
        seen.append(_pieces(_step(after)))
    assert seen == reference  # each global step holds the same rows, whatever the DP size

    # Over epoch 0 every token of every non-empty document was trained on exactly once.
    count = {d: np.zeros(n, dtype=int) for d, n in enumerate(dataset.lengths)}
    for step in seen:
        for epoch, doc, start, length in step:
            if epoch == 0:
                count[doc][start : start + length] += 1
    assert all((c == 1).all() for c in count.values())


def test_mismatched_resume_is_refused(dataset):
    (ld,) = _loaders(dataset, 1)
    next(ld)
    state = ld.state_dict()
    (other,) = _loaders(dataset, 1, LoaderConfig(seq_len=32, global_batch_rows=8))
    with pytest.raises(ValueError, match="seq_len=64 but this one 32"):
        other.load_state_dict(state)
    smaller = TokenDataset([dataset.shards[0].prefix])
    with pytest.raises(ValueError, match="checkpoint was taken on a dataset"):
        PackedLoader(smaller, CONFIG, dp_rank=0, dp_size=1).load_state_dict(state)
    with pytest.raises(ValueError, match="not a multiple of dp_size"):
        PackedLoader(dataset, CONFIG, dp_rank=0, dp_size=3)


# -- pinned output ---------------------------------------------------------------------------
# Digests of every batch (all tensors, their dtypes and shapes), balance report and state of the
# scenarios below, computed with the per-piece Python loader of 2026-11-23 before it was
# vectorized: a faster loader must deliver exactly the same batches, in the same order.


def _digest(*objs) -> str:
    h = hashlib.sha256()

    def feed(o):
        if isinstance(o, torch.Tensor):
            h.update(f"T{o.dtype}{tuple(o.shape)}".encode())
            h.update(o.contiguous().numpy().tobytes())
        elif isinstance(o, dict):
            for k, v in o.items():
                h.update(repr(k).encode())
                feed(v)
        elif isinstance(o, list | tuple):
            h.update(f"L{len(o)}".encode())
            for v in o:
                feed(v)
        else:
            h.update(repr(o).encode())

    for o in objs:
        feed(o)
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def mixed_dataset(tmp_path_factory):
    """Shard 0 with a loss mask, shard 1 without; empty, exact-fit and over-long documents."""
    folder = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(11)
    lengths = [*rng.integers(1, 50, 60).tolist(), 0, 130, 64, 48, 1, 0, 97]
    prefixes = []
    for s, part in enumerate(np.array_split(np.arange(len(lengths)), 2)):
        prefixes.append(folder / f"shard_{s}")
        with IndexedDatasetWriter(prefixes[-1], dtype=np.uint32, with_mask=s == 0) as w:
            for d in part:
                ids = rng.integers(0, 70000, lengths[d])
                w.add(ids, rng.integers(0, 2, lengths[d]) if s == 0 else None)
    return TokenDataset(prefixes)


def _run(loaders, steps):
    out = []
    for _ in range(steps):
        out.append(_step(loaders))
        out.append([(ld.last_report.naive, ld.last_report.balanced) for ld in loaders])
    return [out, [ld.state_dict() for ld in loaders]]


_SCENARIOS = {
    "balanced_dp2": (LoaderConfig(seq_len=64, global_batch_rows=8, seed=7), 2, {}),
    "truncate_window3_dp3": (
        LoaderConfig(
            seq_len=48,
            global_batch_rows=12,
            micro_batch_rows=2,
            seed=3,
            shuffle=False,
            pack_window=3,
            overlong="truncate",
        ),
        3,
        {},
    ),
    "skip_unbalanced_dp2": (
        LoaderConfig(
            seq_len=40, global_batch_rows=8, micro_batch_rows=2, overlong="skip", balance=False
        ),
        2,
        {"pad_id": 5},
    ),
    "dp1_micro3_cost": (
        LoaderConfig(seq_len=64, global_batch_rows=6, micro_batch_rows=2, seed=5),
        1,
        {"cost_model": QuadraticCost(a=1.0, b=1e-2, c=3.0)},
    ),
}
_PINNED_DIGESTS = {
    "balanced_dp2": "3aed7e83bdc628d2",
    "truncate_window3_dp3": "4ffcb5a4abcb097e",
    "skip_unbalanced_dp2": "fa4c4dfcecd0df68",
    "dp1_micro3_cost": "d283f89454d040d9",
    "resume_dp2_to_dp4": "87fd2ae2a772c569",
    "mixture": "46edf23c6fc6f764",
    "mixture_unmasked": "5e8676b2a8f5b707",
}


@pytest.mark.parametrize("name", sorted(_SCENARIOS))
def test_batches_are_pinned(mixed_dataset, name):
    config, dp, kwargs = _SCENARIOS[name]
    loaders = [
        PackedLoader(mixed_dataset, config, dp_rank=r, dp_size=dp, **kwargs) for r in range(dp)
    ]
    assert _digest(_run(loaders, 12)) == _PINNED_DIGESTS[name]


def test_resumed_batches_are_pinned(mixed_dataset):
    config = LoaderConfig(seq_len=64, global_batch_rows=8, seed=7)
    before = _loaders(mixed_dataset, 2, config)
    _run(before, 5)
    after = _loaders(mixed_dataset, 4, config)
    for ld in after:
        ld.load_state_dict(before[0].state_dict())
    assert _digest(_run(after, 6)) == _PINNED_DIGESTS["resume_dp2_to_dp4"]


def test_mixture_batches_are_pinned(mixed_dataset):
    mix = MixtureDataset(
        [mixed_dataset, TokenDataset([mixed_dataset.shards[1].prefix])],
        [0.5, 0.5],
        num_documents=90,
        seed=2,
    )
    config = LoaderConfig(seq_len=32, global_batch_rows=4, micro_batch_rows=2)
    loaders = [PackedLoader(mix, config, dp_rank=r, dp_size=2) for r in range(2)]
    assert _digest(_run(loaders, 8)) == _PINNED_DIGESTS["mixture"]


def test_mixture_without_masks_batches_are_pinned(mixed_dataset):
    """A mixture of mask-less sources (one of them twice, another a mixture itself), with
    over-long documents split: pinned before ``MixtureDataset.gather`` replaced per-document
    reads."""
    unmasked = TokenDataset([mixed_dataset.shards[1].prefix])
    inner = MixtureDataset([unmasked, unmasked], [0.3, 0.7], num_documents=40, seed=4)
    mix = MixtureDataset([unmasked, inner, unmasked], [0.2, 0.5, 0.3], num_documents=120, seed=9)
    config = LoaderConfig(seq_len=24, global_batch_rows=6, micro_batch_rows=3, seed=1)
    loaders = [PackedLoader(mix, config, dp_rank=r, dp_size=2) for r in range(2)]
    assert _digest(_run(loaders, 10)) == _PINNED_DIGESTS["mixture_unmasked"]


# -- documents moved between ranks' rows -----------------------------------------------------
MOVING = LoaderConfig(seq_len=SEQ, global_batch_rows=8, seed=7, move_documents=True)
# A large per-document cost makes rows of many short documents much costlier than others.
PER_DOC = QuadraticCost(a=1.0, b=1e-2, c=200.0)


def test_moving_documents_keeps_each_steps_pieces_and_the_tokens(dataset):
    fixed = [
        PackedLoader(dataset, CONFIG, dp_rank=r, dp_size=4, cost_model=PER_DOC) for r in range(4)
    ]
    moving = [
        PackedLoader(dataset, MOVING, dp_rank=r, dp_size=4, cost_model=PER_DOC) for r in range(4)
    ]
    moved = 0
    for _ in range(6):
        a, b = _step(fixed), _step(moving)
        assert _pieces(a) == _pieces(b)  # the same pieces, in other rows
        # Which pieces each rank trains on: exchanges move some to other ranks.
        moved += [_pieces([r]) for r in a] != [_pieces([r]) for r in b]
        assert moving[0].last_report.balanced <= fixed[0].last_report.balanced + 1e-12
        assert all(ld.last_report == moving[0].last_report for ld in moving)
        for micro in (m for rank in b for m in rank):
            offset = {}
            for row, _, doc, start, length in micro["pieces"].tolist():
                t = offset.get(row, 0)
                ids, _ = dataset.document(doc)
                expected = torch.as_tensor(ids[start : start + length].astype(np.int64))
                assert torch.equal(micro["input_ids"][row, t : t + length], expected)
                offset[row] = t + length
            assert max(offset.values()) <= SEQ
    assert moved > 0  # documents did change rows in some step


def test_moving_documents_resumes_exactly_and_at_another_dp_size(dataset):
    def loaders(dp):
        return [
            PackedLoader(dataset, MOVING, dp_rank=r, dp_size=dp, cost_model=PER_DOC)
            for r in range(dp)
        ]

    straight = loaders(2)
    reference = [_step(straight) for _ in range(6)]
    first = loaders(2)
    for _ in range(3):
        _step(first)
    resumed, other = loaders(2), loaders(4)
    for ld in [*resumed, *other]:
        ld.load_state_dict(first[0].state_dict())
    for k in range(3, 6):
        got = _step(resumed)
        assert _digest(got) == _digest(reference[k])
        assert _pieces(_step(other)) == _pieces(reference[k])
