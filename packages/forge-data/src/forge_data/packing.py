"""Sequence packing: several documents per row, attention and loss never crossing documents.

Documents are placed, in the given (shuffled) order, into rows of ``seq_len`` tokens by first-fit
over a bounded window of open rows (the "packing with a window" of Krell et al. 2021, "Efficient
Sequence Packing without Cross-contamination"; the window keeps the order close to the shuffled
one and the plan streamable). Each document keeps its own ``position_ids`` (restarting at 0), and
:func:`collate_rows` returns ``cu_seqlens`` over the flattened batch (the varlen convention of
FlashAttention, Dao 2023) so attention is block-diagonal per document. A document longer than
``seq_len`` is split into ``seq_len`` chunks, truncated, or skipped (``overlong=``); empty
documents are skipped; both are counted in :class:`PackingStats`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

__all__ = [
    "IGNORE_INDEX",
    "PackingPlan",
    "PackingStats",
    "block_diagonal_mask",
    "collate_rows",
    "pack_documents",
]

IGNORE_INDEX = -100
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
    """Pack documents ``order`` (indices into ``lengths``) into rows of at most ``seq_len``."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if window < 1:
        raise ValueError(f"window must be >= 1 open rows, got {window}")
    if overlong not in ("split", "truncate", "skip"):
        raise ValueError(f"overlong must be 'split', 'truncate' or 'skip', got {overlong!r}")
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.asarray(order, dtype=np.int64)
    pieces: list[tuple[int, int, int]] = []  # (doc, start, length)
    counts = {
        "split": 0,
        "truncated": 0,
        "truncated_tokens": 0,
        "skipped_overlong": 0,
        "skipped_empty": 0,
    }
    for d in order.tolist():
        n = int(lengths[d])
        if n == 0:
            counts["skipped_empty"] += 1
        elif n <= seq_len:
            pieces.append((d, 0, n))
        elif overlong == "split":
            counts["split"] += 1
            pieces += [(d, s, min(seq_len, n - s)) for s in range(0, n, seq_len)]
        elif overlong == "truncate":
            counts["truncated"] += 1
            counts["truncated_tokens"] += n - seq_len
            pieces.append((d, 0, seq_len))
        else:
            counts["skipped_overlong"] += 1

    rows: list[list[int]] = []  # closed rows, as lists of piece indices
    open_rows: list[list[int]] = []
    free: list[int] = []
    for j, (_, _, n) in enumerate(pieces):
        for k, room in enumerate(free):
            if n <= room:
                open_rows[k].append(j)
                free[k] -= n
                if free[k] == 0:
                    rows.append(open_rows.pop(k))
                    free.pop(k)
                break
        else:
            if len(open_rows) == window:
                rows.append(open_rows.pop(0))
                free.pop(0)
            open_rows.append([j])
            free.append(seq_len - n)
            if free[-1] == 0:
                rows.append(open_rows.pop())
                free.pop()
    rows += open_rows

    flat = [j for row in rows for j in row]
    arr = np.asarray([pieces[j] for j in flat], dtype=np.int64).reshape(-1, 3)
    row_sizes = np.asarray([len(r) for r in rows], dtype=np.int64)
    stats = PackingStats(
        documents=int(order.size),
        pieces=len(pieces),
        rows=len(rows),
        tokens=int(arr[:, 2].sum()),
        seq_len=seq_len,
        **counts,
    )
    return PackingPlan(
        doc=arr[:, 0],
        start=arr[:, 1],
        length=arr[:, 2],
        row=np.repeat(np.arange(len(rows)), row_sizes),
        row_offsets=np.concatenate([[0], np.cumsum(row_sizes)]),
        stats=stats,
    )


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
    ``max_seqlen``.
    """
    B = len(rows)
    input_ids = torch.full((B, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((B, seq_len), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, seq_len), dtype=torch.long)
    document_ids = torch.full((B, seq_len), -1, dtype=torch.long)
    seqlens: list[int] = []
    for b, pieces in enumerate(rows):
        t = 0
        for p, (ids, mask) in enumerate(pieces):
            n = len(ids)
            if t + n > seq_len:
                raise ValueError(f"row {b} holds more than seq_len={seq_len} tokens")
            ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64))
            input_ids[b, t : t + n] = ids_t
            target = ids_t[1:].clone()
            if mask is not None:
                target[torch.as_tensor(np.asarray(mask[1:]) == 0)] = IGNORE_INDEX
            labels[b, t : t + n - 1] = target
            position_ids[b, t : t + n] = torch.arange(n)
            document_ids[b, t : t + n] = p
            seqlens.append(n)
            t += n
        if t < seq_len:
            seqlens.append(seq_len - t)
            position_ids[b, t:] = torch.arange(seq_len - t)
    cu = torch.zeros(len(seqlens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(seqlens, dtype=torch.int32), 0)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "document_ids": document_ids,
        "cu_seqlens": cu,
        "max_seqlen": torch.tensor(max(seqlens) if seqlens else 0),
    }


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
