"""Sequence packing: several documents per row, attention and loss never crossing documents.

Documents are placed, in the given (shuffled) order, into rows of ``seq_len`` tokens by first-fit
over a bounded window of open rows (the "packing with a window" of Krell et al. 2021, "Efficient
Sequence Packing without Cross-contamination"; the window keeps the order close to the shuffled
one and the plan streamable). Each document keeps its own ``position_ids`` (restarting at 0), and
:func:`collate_rows` returns ``cu_seqlens`` over the flattened batch (the varlen convention of
FlashAttention, Dao 2023) so attention is block-diagonal per document. A document longer than
``seq_len`` is split into ``seq_len`` chunks, truncated, or skipped (``overlong=``); empty
documents are skipped; both are counted in :class:`PackingStats`.

Cutting documents into pieces and laying out the plan are whole-array numpy operations, and the
first-fit search is a max-tree over the open rows (``O(log window)`` per piece); collation is
vectorized in :mod:`forge_data.collate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from forge_data.collate import IGNORE_INDEX, collate_flat

__all__ = [
    "IGNORE_INDEX",
    "PackingPlan",
    "PackingStats",
    "block_diagonal_mask",
    "collate_rows",
    "pack_documents",
]

Overlong = Literal["split", "truncate", "skip"]


@dataclass(frozen=True, kw_only=True)
class PackingStats:
    """Counts of one packing plan; ``padding_waste`` is the padded fraction of all row slots."""

    documents: int
    pieces: int
    rows: int
    tokens: int
    seq_len: int
    split: int
    truncated: int
    truncated_tokens: int
    skipped_overlong: int
    skipped_empty: int

    @property
    def padding_waste(self) -> float:
        return 1.0 - self.tokens / max(self.rows * self.seq_len, 1)


@dataclass(frozen=True, kw_only=True)
class PackingPlan:
    """Rows as pieces: piece ``j`` is tokens ``[start[j], start[j]+length[j])`` of document
    ``doc[j]``, placed in row ``row[j]``; pieces of a row are consecutive and in order."""

    doc: np.ndarray
    start: np.ndarray
    length: np.ndarray
    row: np.ndarray
    row_offsets: np.ndarray  # pieces of row r: [row_offsets[r], row_offsets[r + 1])
    stats: PackingStats

    @property
    def num_rows(self) -> int:
        return self.row_offsets.size - 1

    def row_pieces(self, r: int) -> slice:
        return slice(int(self.row_offsets[r]), int(self.row_offsets[r + 1]))


def pack_documents(
    order: Sequence[int] | np.ndarray,
    lengths: np.ndarray,
    *,
    seq_len: int,
    window: int = 64,
    overlong: Overlong = "split",
) -> PackingPlan:
    """Pack documents ``order`` (indices into ``lengths``) into rows of at most ``seq_len``.

    Cutting documents into pieces and laying out the plan are numpy array operations; only the
    first-fit placement is a loop over pieces, since each placement changes the room the next
    piece sees (:func:`_first_fit`).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if window < 1:
        raise ValueError(f"window must be >= 1 open rows, got {window}")
    if overlong not in ("split", "truncate", "skip"):
        raise ValueError(f"overlong must be 'split', 'truncate' or 'skip', got {overlong!r}")
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.asarray(order, dtype=np.int64).reshape(-1)
    doc, start, length, counts = _cut_pieces(order, lengths, seq_len=seq_len, overlong=overlong)
    row_of, num_rows = _first_fit(length.tolist(), seq_len=seq_len, window=window)
    # Rows are numbered in the order they close; a row's pieces keep their placement order.
    flat = np.argsort(row_of, kind="stable")
    row_sizes = np.bincount(row_of, minlength=num_rows)
    doc, start, length = doc[flat], start[flat], length[flat]
    stats = PackingStats(
        documents=int(order.size),
        pieces=int(doc.size),
        rows=num_rows,
        tokens=int(length.sum()),
        seq_len=seq_len,
        **counts,
    )
    return PackingPlan(
        doc=doc,
        start=start,
        length=length,
        row=np.repeat(np.arange(num_rows), row_sizes),
        row_offsets=np.concatenate([[0], np.cumsum(row_sizes)]),
        stats=stats,
    )


def _cut_pieces(
    order: np.ndarray, lengths: np.ndarray, *, seq_len: int, overlong: Overlong
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """``(doc, start, length)`` of the pieces of documents ``order``, in order, and the counts
    of split / truncated / skipped documents: empty documents give no piece; over-long ones
    ``ceil(n / seq_len)`` chunks (``split``), their first ``seq_len`` tokens (``truncate``) or
    nothing (``skip``)."""
    n = lengths[order]
    over = n > seq_len
    if overlong == "split":
        num = -(-n // seq_len)
    elif overlong == "truncate":
        num = (n > 0).astype(np.int64)
    else:
        num = ((n > 0) & ~over).astype(np.int64)
    doc = np.repeat(order, num)
    first = np.cumsum(num) - num  # index of each document's first piece
    start = (np.arange(doc.size) - np.repeat(first, num)) * seq_len
    length = np.minimum(np.repeat(n, num) - start, seq_len)
    n_over = int(over.sum())
    counts = {
        "split": n_over if overlong == "split" else 0,
        "truncated": n_over if overlong == "truncate" else 0,
        "truncated_tokens": int((n[over] - seq_len).sum()) if overlong == "truncate" else 0,
        "skipped_overlong": n_over if overlong == "skip" else 0,
        "skipped_empty": int((n == 0).sum()),
    }
    return doc, start, length, counts


def _first_fit(sizes: list[int], *, seq_len: int, window: int) -> tuple[np.ndarray, int]:
    """First fit over a window of open rows: each piece goes to the oldest open row with room
    for it, else opens a new row (closing the oldest open one when ``window`` are open); a row
    closes when full. Returns each piece's row, rows numbered in closing order (the rows still
    open at the end close last, oldest first), and the number of rows.

    Each placement changes the room the next piece sees, so this is a loop over pieces; the
    search is ``O(log window)``: open rows sit in slots in opening order under a max-tree of
    their room (a tournament tree, as first-fit bin packing is usually implemented, Johnson
    1974), so the oldest row with room is found by descending from the root. Closed rows leave
    empty slots (room 0, which no piece fits); slots are compacted when they run out.
    """
    cap = 1 << (2 * window).bit_length()  # >= 2 * window slots: compaction is amortized O(1)
    tree = [0] * (2 * cap)  # tree[cap + s]: room of slot s; tree[i]: max of its two children
    slot_serial = [0] * cap  # serial number (opening order) of the row in each slot
    serial_of = [0] * len(sizes)  # serial number of each piece's row
    closed: list[int] = []  # serial numbers in closing order
    opened = used = oldest = n_open = 0  # rows opened, slots used, oldest live slot, open rows

    def set_room(leaf: int, room: int) -> None:
        tree[leaf] = room
        i = leaf >> 1
        while i:
            a, b = tree[2 * i], tree[2 * i + 1]
            m = a if a > b else b
            if tree[i] == m:
                return  # the ancestors are unchanged
            tree[i] = m
            i >>= 1

    for j, n in enumerate(sizes):
        if tree[1] >= n:  # some open row has room: descend to the oldest one
            i = 1
            while i < cap:
                i <<= 1
                if tree[i] < n:
                    i += 1
            serial_of[j] = slot_serial[i - cap]
            room = tree[i] - n
            if not room:
                closed.append(slot_serial[i - cap])
                n_open -= 1
            set_room(i, room)
            continue
        if n_open == window:  # close the oldest open row
            while not tree[cap + oldest]:
                oldest += 1
            closed.append(slot_serial[oldest])
            set_room(cap + oldest, 0)
            n_open -= 1
        serial_of[j] = opened
        if n == seq_len:
            closed.append(opened)
        else:
            if used == cap:  # move the open rows to the first slots, in order
                live = [s for s in range(cap) if tree[cap + s]]
                rooms = [tree[cap + s] for s in live]
                slot_serial[: len(live)] = [slot_serial[s] for s in live]
                tree[cap:] = rooms + [0] * (cap - len(live))
                for i in range(cap - 1, 0, -1):
                    tree[i] = max(tree[2 * i], tree[2 * i + 1])
                used, oldest = len(live), 0
            slot_serial[used] = opened
            set_room(cap + used, seq_len - n)
            used += 1
            n_open += 1
        opened += 1
    closed += [slot_serial[s] for s in range(used) if tree[cap + s]]
    rank = np.empty(opened, dtype=np.int64)
    rank[np.asarray(closed, dtype=np.int64)] = np.arange(opened)
    return rank[np.asarray(serial_of, dtype=np.int64)], opened


def collate_rows(
    rows: Sequence[Sequence[tuple[np.ndarray, np.ndarray | None]]],
    *,
    seq_len: int,
    pad_id: int,
) -> dict[str, torch.Tensor]:
    """Tensors of a micro-batch of packed rows.

    ``rows[b]`` is the list of ``(token_ids, loss_mask or None)`` pieces of row ``b``. Returns
    ``input_ids``, ``labels`` (next token of the same document, ``IGNORE_INDEX`` at a document's
    last token, on padding, and where the loss mask is 0), ``position_ids`` (restarting per
    document), ``document_ids`` (piece index in its row, -1 on padding), ``cu_seqlens`` (int32,
    over the flattened ``B * seq_len`` tokens; each row's padding is one more segment) and
    ``max_seqlen``. The pieces are joined and handed to :func:`~forge_data.collate.collate_flat`.
    """
    pieces = [p for row in rows for p in row]
    ids = [np.asarray(p[0], dtype=np.int64).reshape(-1) for p in pieces]
    lengths = np.fromiter((a.size for a in ids), dtype=np.int64, count=len(ids))
    keep = None
    if any(p[1] is not None for p in pieces):
        keep = [
            np.ones(a.size, dtype=bool) if p[1] is None else np.asarray(p[1]).reshape(-1) != 0
            for a, p in zip(ids, pieces, strict=True)
        ]
        for i, (a, k) in enumerate(zip(ids, keep, strict=True)):
            if a.size != k.size:
                raise ValueError(f"piece {i} has {a.size} token ids but a loss mask of {k.size}")
        keep = np.concatenate(keep) if keep else np.zeros(0, dtype=bool)
    return collate_flat(
        np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64),
        lengths,
        np.fromiter((len(row) for row in rows), dtype=np.int64, count=len(rows)),
        seq_len=seq_len,
        pad_id=pad_id,
        keep=keep,
    )


def block_diagonal_mask(cu_seqlens: torch.Tensor, *, causal: bool = True) -> torch.Tensor:
    """The ``(T, T)`` boolean attention mask (True: may attend) that ``cu_seqlens`` describes, for
    attention backends without varlen support (SDPA with an explicit mask) and for tests."""
    total = int(cu_seqlens[-1])
    seg = torch.repeat_interleave(
        torch.arange(cu_seqlens.numel() - 1), (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    )
    mask = seg[:, None] == seg[None, :]
    if causal:
        mask &= torch.ones(total, total, dtype=torch.bool).tril()
    return mask
