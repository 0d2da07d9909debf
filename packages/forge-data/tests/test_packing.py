"""Packing invariants: every token exactly once, attention and labels never cross documents."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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
