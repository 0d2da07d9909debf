"""Packing invariants: every token exactly once, attention and labels never cross documents."""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pytest
import torch

from forge_data.collate import collate_flat
from forge_data.packing import IGNORE_INDEX, block_diagonal_mask, collate_rows, pack_documents


def _docs(seed=0, n=60):
    rng = np.random.default_rng(seed)
    lengths = np.concatenate([rng.integers(1, 40, n - 4), [0, 0, 95, 64]])  # empties, 1 overlong
    # Document d holds the tokens 1000*d + 0, 1, 2, ...: every token says where it came from.
    return lengths, [np.arange(n_) + 1000 * d for d, n_ in enumerate(lengths)]


def test_plan_covers_every_token_once_and_respects_seq_len():
    lengths, _ = _docs()
    order = np.random.default_rng(1).permutation(lengths.size)
    plan = pack_documents(order, lengths, seq_len=64, window=4, overlong="split")
    covered = {d: np.zeros(n, dtype=int) for d, n in enumerate(lengths)}
    for d, s, n in zip(plan.doc, plan.start, plan.length, strict=True):
        covered[int(d)][s : s + n] += 1
    assert all((c == 1).all() for c in covered.values())
    row_tokens = np.bincount(plan.row, weights=plan.length, minlength=plan.num_rows)
    assert row_tokens.max() <= 64
    st = plan.stats
    assert (st.split, st.skipped_empty, st.tokens) == (1, 2, int(lengths.sum()))
    assert st.padding_waste == pytest.approx(1 - lengths.sum() / (64 * st.rows))
    assert st.padding_waste < 0.1  # first-fit over a window packs tightly


def test_overlong_truncate_and_skip_are_counted():
    lengths = np.array([10, 100, 5])
    trunc = pack_documents([0, 1, 2], lengths, seq_len=32, overlong="truncate")
    assert (trunc.stats.truncated, trunc.stats.truncated_tokens, trunc.stats.tokens) == (1, 68, 47)
    skip = pack_documents([0, 1, 2], lengths, seq_len=32, overlong="skip")
    assert (skip.stats.skipped_overlong, skip.stats.tokens) == (1, 15)
    assert 1 not in skip.doc.tolist()
    with pytest.raises(ValueError, match="overlong must be"):
        pack_documents([0], lengths, seq_len=32, overlong="drop")


def test_collated_batch_keeps_documents_apart():
    lengths, docs = _docs(seed=2, n=30)
    plan = pack_documents(np.arange(lengths.size), lengths, seq_len=64, window=8)
    rows = [
        [
            (docs[d][s : s + n], None)
            for d, s, n in zip(plan.doc[sl], plan.start[sl], plan.length[sl], strict=True)
        ]
        for sl in (plan.row_pieces(r) for r in range(plan.num_rows))
    ]
    batch = collate_rows(rows, seq_len=64, pad_id=-1)
    ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    doc_of_token = torch.where(ids >= 0, ids // 1000, -1).reshape(-1)
    cu = batch["cu_seqlens"]
    assert cu[-1] == ids.numel()
    assert cu.dtype == torch.int32
    # Each cu_seqlens segment holds one document (or one row's padding).
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        assert doc_of_token[a:b].unique().numel() == 1
    # The mask it implies never lets a token see another document's token.
    mask = block_diagonal_mask(cu)
    cross = doc_of_token[:, None] != doc_of_token[None, :]
    assert not (mask & cross).any()
    assert mask.sum(dim=1).min() >= 1
    # Positions restart per document (and per seq_len chunk of a split one); labels are the next
    # token of the same piece only.
    real = ids >= 0
    assert plan.stats.split == 1
    assert torch.equal(pos[real], (ids % 1000 % 64)[real])
    target = labels != IGNORE_INDEX
    assert torch.equal(labels[target], ids[target] + 1)
    last_of_doc = real & (torch.roll(ids, -1, dims=1) != ids + 1)
    assert not target[last_of_doc].any()
    assert int(target.sum()) == int(lengths.sum()) - plan.doc.size
    assert int(batch["max_seqlen"]) == int((cu[1:] - cu[:-1]).max())


def test_loss_mask_hides_targets_outside_the_assistant_span():
    ids = np.array([5, 6, 7, 8, 9])
    mask = np.array([0, 0, 1, 1, 0])  # train on predicting 7 and 8 only
    batch = collate_rows([[(ids, mask)]], seq_len=6, pad_id=0)
    assert batch["labels"].tolist() == [[-100, 7, 8, -100, -100, -100]]


# -- pinned output ---------------------------------------------------------------------------
# Digests computed with the per-piece Python packer and collator of 2026-11-23, before they were
# vectorized: the fast versions must produce exactly the same plans and tensors.


def _digest(*objs) -> str:
    h = hashlib.sha256()
    for o in objs:
        if isinstance(o, torch.Tensor):
            o = o.contiguous().numpy()
        if isinstance(o, np.ndarray):
            h.update(f"{o.dtype}{o.shape}".encode() + o.tobytes())
        else:
            h.update(repr(o).encode())
    return h.hexdigest()[:16]


def _plan_digest(plan) -> str:
    return _digest(plan.doc, plan.start, plan.length, plan.row, plan.row_offsets, plan.stats)


_PINNED_PLANS = {
    (1, "split"): "adbd8f0ef73d1202",
    (4, "split"): "6f483f0321eea908",
    (64, "split"): "00cceae001f83c83",
    (4, "truncate"): "da3f43ebe7747db3",
    (16, "skip"): "a06bc6af0b360ae3",
}


@pytest.mark.parametrize(("window", "overlong"), sorted(_PINNED_PLANS))
def test_plans_are_pinned(window, overlong):
    rng = np.random.default_rng(window)
    lengths = np.minimum(rng.lognormal(3.5, 1.2, 3000), 700).astype(np.int64)
    lengths[rng.integers(0, lengths.size, 50)] = 0
    order = rng.permutation(lengths.size)[:2500]
    plan = pack_documents(order, lengths, seq_len=128, window=window, overlong=overlong)
    assert _plan_digest(plan) == _PINNED_PLANS[(window, overlong)]


def test_degenerate_plans_are_pinned():
    empty = pack_documents([], np.zeros(0, dtype=np.int64), seq_len=8)
    skipped = pack_documents([1, 0], np.array([0, 9]), seq_len=8, overlong="skip")
    exact = pack_documents([0, 1, 2], np.array([8, 8, 3]), seq_len=8, window=1)
    assert [_plan_digest(p) for p in (empty, skipped, exact)] == [
        "cf4e008b8bdc1773",
        "dd2785a7b5c3e337",
        "4174f994dca4b7aa",
    ]


def _pinned_rows():
    """Rows of pieces with no mask, a uint8 mask or a bool mask, ids as arrays or lists, full
    rows, a row with padding and an all-padding row."""
    rng = np.random.default_rng(5)
    rows = []
    for b in range(6):
        row, room = [], 24
        while room > 0:
            n = min(int(rng.integers(1, 12)), room)
            ids = rng.integers(0, 500, n)
            kind = (b + len(row)) % 3
            mask = None if kind == 0 else rng.integers(0, 2, n).astype([0, np.uint8, bool][kind])
            row.append((ids.tolist() if b == 2 else ids, mask))
            room -= n + (b == 4)
        rows.append(row)
    rows.append([])
    return rows


def test_collated_batches_are_pinned():
    rows = _pinned_rows()
    batches = [
        collate_rows(rows, seq_len=24, pad_id=-1),
        collate_rows(rows[:3], seq_len=30, pad_id=7),
        collate_rows([], seq_len=8, pad_id=0),
    ]
    assert [_digest(*b.keys(), *b.values()) for b in batches] == [
        "8569d62d66e2d388",
        "320ef657b3d04b8f",
        "f952c2a7f6cf9e97",
    ]
    too_long = [[(np.arange(4), None)], [(np.arange(6), None), (np.arange(5), None)]]
    with pytest.raises(ValueError, match="row 1 holds more than seq_len=10"):
        collate_rows(too_long, seq_len=10, pad_id=0)


def test_flat_collation_rejects_inconsistent_pieces():
    ids = np.arange(6)
    with pytest.raises(ValueError, match="3 pieces in the rows but 2 lengths"):
        collate_flat(ids, np.array([2, 4]), np.array([1, 2]), seq_len=8, pad_id=0)
    with pytest.raises(ValueError, match="7 tokens in the lengths but 6 ids"):
        collate_flat(ids, np.array([3, 4]), np.array([2]), seq_len=8, pad_id=0)
    with pytest.raises(ValueError, match="loss mask holds 5 values for 6 tokens"):
        collate_flat(ids, np.array([6]), np.array([1]), seq_len=8, pad_id=0, keep=np.ones(5, bool))
    with pytest.raises(ValueError, match="piece 1 has 2 token ids but a loss mask of 3"):
        collate_rows([[(ids[:3], None), (ids[:2], np.ones(3))]], seq_len=8, pad_id=0)
    read_only = np.arange(8)
    read_only.flags.writeable = False
    with warnings.catch_warnings():  # torch warns on tensors over read-only memory
        warnings.simplefilter("error")
        batch = collate_flat(read_only, np.array([8]), np.array([1]), seq_len=8, pad_id=0)
    assert batch["input_ids"].tolist() == [list(range(8))]
