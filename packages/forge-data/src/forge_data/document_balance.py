"""Load-aware balancing that also moves documents between the rows of different ranks.

:func:`~forge_data.balance.balance_step` moves packed rows whole, so a row full of costly
documents (images with their encoder cost, long documents with quadratic attention) bounds what
any assignment of rows can reach: its rank still needs ``rows_per_rank - 1`` more rows, and
there are too few light ones for every heavy row. :func:`balance_step_documents` first assigns
rows to ranks as ``balance_step`` does, then exchanges single documents (packed pieces) between
a row of the heaviest rank and a row of the lightest one, as long as both rows still fit in
``seq_len`` tokens: the exchange that brings the two ranks' loads closest, never raising the
maximum (the pairwise-exchange step of Karmarkar & Karp 1982 differencing, on documents instead
of rows). Rows keep their rank and count, only their contents change; the pieces of the step
are the same, none dropped or repeated, and the result is a deterministic function of the step
(ties break by index), so every rank computes the same plan with no communication. Then each
rank's rows are split into micro-batches from their new costs.

The cost of a row must be the sum of its documents' costs (true of
:class:`~forge_data.balance.QuadraticCost` and :class:`~forge_data.vision.cost.VisionCost`).
"""

from __future__ import annotations

import numpy as np

from forge_data.balance import (
    BalanceReport,
    balanced_assignment,
    group_by,
    imbalance,
    micro_batch_layout,
)

__all__ = ["balance_step_documents", "exchange_documents"]


def exchange_documents(
    piece_row: np.ndarray,
    piece_length: np.ndarray,
    piece_cost: np.ndarray,
    row_rank: np.ndarray,
    *,
    seq_len: int,
    num_ranks: int,
    steps: int = 16,
    partners: int = 8,
    tolerance: float = 0.01,
) -> np.ndarray:
    """New row of every piece after up to ``steps`` exchanges of one piece of the heaviest rank
    with one piece of one of the ``partners`` lightest ranks (see the module doc);
    ``row_rank[r]`` is row ``r``'s rank. Each exchange keeps both rows within ``seq_len`` tokens
    and is the one that lowers the larger of the two new loads the most, below the heaviest
    rank's load: the maximum never rises. Stops early once the maximum is within ``tolerance``
    of the mean."""
    piece_row = np.array(piece_row, dtype=np.int64)
    length = np.asarray(piece_length, dtype=np.int64)
    cost = np.asarray(piece_cost, dtype=np.float64)
    row_rank = np.asarray(row_rank, dtype=np.int64)
    n_rows = row_rank.size
    slack = seq_len - np.bincount(piece_row, weights=length, minlength=n_rows).astype(np.int64)
    if (slack < 0).any():
        raise ValueError(
            f"row {int(np.argmax(slack < 0))} holds more than seq_len={seq_len} tokens"
        )
    piece_rank = row_rank[piece_row]
    loads = np.bincount(piece_rank, weights=cost, minlength=num_ranks)
    target = loads.mean() * (1 + tolerance)
    # Pieces grouped by rank; an exchange swaps two pieces' places, so the groups keep their size.
    order = group_by(piece_rank, num_ranks)
    place = np.empty_like(order)
    place[order] = np.arange(order.size)
    bounds = np.concatenate([[0], np.cumsum(np.bincount(piece_rank, minlength=num_ranks))])
    k = min(partners, num_ranks - 1)
    for _ in range(steps if k > 0 else 0):
        hi = int(np.argmax(loads))
        if loads[hi] <= target:
            break
        light = np.argpartition(loads, k)[: k + 1] if k + 1 < num_ranks else np.arange(num_ranks)
        light = np.sort(light[light != hi])[:k]  # ties: lower rank ids first, deterministic
        a = order[bounds[hi] : bounds[hi + 1]]
        b = np.concatenate([order[bounds[r] : bounds[r + 1]] for r in light.tolist()])
        delta = cost[a][:, None] - cost[b][None, :]
        grow = length[b][None, :] - length[a][:, None]  # tokens row_a gains, row_b loses
        fits = (grow <= slack[piece_row[a]][:, None]) & (-grow <= slack[piece_row[b]][None, :])
        other = loads[piece_rank[b]][None, :] + delta
        new_max = np.maximum(loads[hi] - delta, other)
        score = np.where(fits & (delta > 0) & (other < loads[hi]), new_max, np.inf)
        flat = int(np.argmin(score))
        if not np.isfinite(score.flat[flat]):
            break
        i, j = divmod(flat, b.size)
        p, q = int(a[i]), int(b[j])
        rp, rq, lo = int(piece_row[p]), int(piece_row[q]), int(piece_rank[q])
        slack[rp] -= grow[i, j]
        slack[rq] += grow[i, j]
        piece_row[p], piece_row[q] = rq, rp
        piece_rank[p], piece_rank[q] = lo, hi
        order[place[p]], order[place[q]] = q, p
        place[p], place[q] = place[q], place[p]
        loads[hi] -= delta[i, j]
        loads[lo] += delta[i, j]
    return piece_row


def balance_step_documents(
    piece_row: np.ndarray,
    piece_length: np.ndarray,
    piece_cost: np.ndarray,
    *,
    n_rows: int,
    seq_len: int,
    dp_size: int,
    micro_batches: int,
    rank: int | None = None,
    refine_steps: int | None = None,
    document_steps: int = 16,
) -> tuple[np.ndarray, np.ndarray, BalanceReport]:
    """Rows to ranks, documents between ranks' rows, rows to micro-batches (see module doc).

    ``piece_row[j]`` is the row (``< n_rows``) of piece ``j``, ``piece_length[j]`` its tokens
    and ``piece_cost[j]`` its cost. Returns the pieces' new rows, the ``layout`` of
    :func:`~forge_data.balance.balance_step` (``(dp_size, micro_batches, rows_per_micro_batch)``
    row indices; only ``layout[rank]`` with ``rank``) and the max/mean rank cost of the naive
    contiguous split and of the result.
    """
    piece_row = np.asarray(piece_row, dtype=np.int64)
    piece_cost = np.asarray(piece_cost, dtype=np.float64)
    per_rank, rem = divmod(n_rows, dp_size)
    if rem or per_rank % micro_batches or per_rank == 0:
        raise ValueError(
            f"a global batch of {n_rows} rows does not split into dp_size={dp_size} x "
            f"micro_batches={micro_batches} equal micro-batches: use a multiple of "
            f"{dp_size * micro_batches} rows"
        )
    if rank is not None and not 0 <= rank < dp_size:
        raise ValueError(f"rank {rank} is outside [0, dp_size={dp_size})")
    row_costs = np.bincount(piece_row, weights=piece_cost, minlength=n_rows)
    naive = imbalance(row_costs.reshape(dp_size, per_rank).sum(axis=1))
    rank_of = balanced_assignment(row_costs, dp_size, refine_steps=refine_steps)
    if dp_size > 1 and document_steps > 0:
        piece_row = exchange_documents(
            piece_row,
            piece_length,
            piece_cost,
            rank_of,
            seq_len=seq_len,
            num_ranks=dp_size,
            steps=document_steps,
        )
        row_costs = np.bincount(piece_row, weights=piece_cost, minlength=n_rows)
    layout = micro_batch_layout(row_costs, rank_of, dp_size, micro_batches, rank)
    balanced = imbalance(np.bincount(rank_of, weights=row_costs, minlength=dp_size))
    return piece_row, layout, BalanceReport(naive=naive, balanced=balanced)
