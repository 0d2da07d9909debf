"""Vectorized collation of packed rows: the tensors of a micro-batch from its pieces' tokens.

A micro-batch arrives flat: the token ids of all its pieces back to back (row by row, pieces in
row order), each piece's length and each row's piece count. A row's pieces fill its first slots
and padding the rest, so the ``B * seq_len`` slots are tiled by segments (each piece, then each
row's padding) and every output is a few whole-array numpy operations over them: ``input_ids``
joins one slice per padded row, ``labels`` are the slots shifted by one with the segment ends
(and masked targets) ignored, ``position_ids`` and ``document_ids`` repeat per-segment values.
No work is per token in Python, and none is per document beyond building small per-segment
arrays. ``cu_seqlens`` follows the varlen convention of FlashAttention (Dao 2023): attention is
block-diagonal per document, and each row's padding is one more segment.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

__all__ = ["IGNORE_INDEX", "collate_flat"]

IGNORE_INDEX = -100


def collate_flat(
    ids: np.ndarray,
    lengths: np.ndarray,
    pieces_per_row: np.ndarray,
    *,
    seq_len: int,
    pad_id: int,
    keep: np.ndarray | None = None,
) -> dict[str, torch.Tensor]:
    """Tensors of ``len(pieces_per_row)`` packed rows of ``seq_len`` slots.

    ``ids`` (int64) are the pieces' tokens back to back, ``lengths`` the pieces' lengths, the
    first ``pieces_per_row[0]`` pieces form row 0 and so on; ``keep`` (bool, per token, or
    ``None``) is the loss mask: a label whose target token has ``keep`` False is ignored.
    Returns the tensors :func:`~forge_data.packing.collate_rows` documents; ``input_ids`` may
    share memory with ``ids`` (pass a copy to keep using it).
    """
    ids = np.asarray(ids, dtype=np.int64)
    if not ids.flags.writeable:  # e.g. a memory map: the tensors must own writable memory
        ids = ids.copy()
    lengths = np.asarray(lengths, dtype=np.int64)
    counts = np.asarray(pieces_per_row, dtype=np.int64)
    B, S, P, T = counts.size, seq_len, lengths.size, ids.size
    if int(counts.sum()) != P or int(lengths.sum()) != T:
        raise ValueError(
            f"{counts.sum()} pieces in the rows but {P} lengths, {lengths.sum()} tokens in the "
            f"lengths but {T} ids: pass the pieces of every row, back to back"
        )
    if keep is not None and np.shape(keep) != (T,):
        raise ValueError(f"the loss mask holds {np.size(keep)} values for {T} tokens")
    row_end = np.cumsum(counts)  # pieces of row b: [row_end[b] - counts[b], row_end[b])
    tok_bounds = np.zeros(B + 1, dtype=np.int64)  # tokens of row b
    tok_bounds[1:] = np.concatenate([[0], np.cumsum(lengths)])[row_end]
    row_tokens = np.diff(tok_bounds)
    if B and row_tokens.max() > S:
        bad = int(np.argmax(row_tokens > S))
        raise ValueError(f"row {bad} holds more than seq_len={S} tokens")

    # Segments tile the B * S slots: each row's pieces, then its padding when there is some.
    pads = S - row_tokens
    padded = np.flatnonzero(pads)
    seg_doc = np.arange(P) - np.repeat(row_end - counts, counts)  # piece index in its row
    seqlens = lengths
    if padded.size:  # padding segment of row b: after its last piece and the earlier ones
        at = row_end[padded] + np.arange(padded.size)
        piece = np.ones(P + padded.size, dtype=bool)
        piece[at] = False
        seqlens = np.empty(piece.size, dtype=np.int64)
        seqlens[at], seqlens[piece] = pads[padded], lengths
        seg_doc, pieces_doc = np.full(piece.size, -1), seg_doc
        seg_doc[piece] = pieces_doc
    cu = np.zeros(seqlens.size + 1, dtype=np.int64)
    np.cumsum(seqlens, out=cu[1:])

    # Place the tokens: a row's pieces fill its first slots, its padding the rest.
    tok_bounds, padded = tok_bounds.tolist(), padded.tolist()
    input_ids = _fill_rows(ids, tok_bounds, padded, S, np.full(S, pad_id, dtype=np.int64))
    # The label of a slot is the next slot's token when that one is kept (not masked out),
    # never at the end of a segment (targets stay within a document) nor on padding.
    labels = np.empty(B * S, dtype=np.int64)
    labels[:-1] = input_ids[1:]
    if keep is not None:  # arithmetic select: no branch per token
        kept = _fill_rows(np.asarray(keep, dtype=bool), tok_bounds, padded, S, np.zeros(S, bool))
        np.multiply(kept[1:], labels[:-1] - IGNORE_INDEX, out=labels[:-1])
        labels[:-1] += IGNORE_INDEX
    for r in padded:
        labels[r * S + S - int(pads[r]) : (r + 1) * S] = IGNORE_INDEX
    labels[cu[1:] - 1] = IGNORE_INDEX
    # Positions restart per segment (per piece, and over each row's padding).
    position_ids = np.repeat(cu[:-1], seqlens)
    np.subtract(_ramp(B * S), position_ids, out=position_ids)
    document_ids = np.repeat(seg_doc, seqlens)
    return {
        "input_ids": torch.from_numpy(input_ids.reshape(B, S)),
        "labels": torch.from_numpy(labels.reshape(B, S)),
        "position_ids": torch.from_numpy(position_ids.reshape(B, S)),
        "document_ids": torch.from_numpy(document_ids.reshape(B, S)),
        "cu_seqlens": torch.from_numpy(cu.astype(np.int32)),
        "max_seqlen": torch.tensor(int(seqlens.max()) if seqlens.size else 0),
    }


def _fill_rows(
    values: np.ndarray, bounds: list[int], padded: list[int], S: int, pad: np.ndarray
) -> np.ndarray:
    """``B * S`` slots: row ``b`` holds ``values[bounds[b]:bounds[b + 1]]`` then padding. Rows
    without padding are one run of ``values``, so this joins one slice per padded row."""
    if not padded:
        return values
    parts, done = [], 0
    for r in padded:
        end = bounds[r + 1]
        parts += [values[done:end], pad[: S - (end - bounds[r])]]
        done = end
    parts.append(values[done:])
    return np.concatenate(parts)


@functools.lru_cache(maxsize=8)
def _ramp_cached(n: int) -> np.ndarray:
    ramp = np.arange(n)
    ramp.flags.writeable = False
    return ramp


def _ramp(n: int) -> np.ndarray:
    """``np.arange(n)``, cached for the few batch sizes a run uses."""
    return _ramp_cached(n) if n <= 1 << 20 else np.arange(n)
