"""Load-aware data-parallel balancing of packed rows.

A packed row's cost is not its token count: attention grows with the square of each document's
length, and images add an encoder cost per sample. :class:`QuadraticCost` models a row as
``sum over its documents of (a*len + b*len**2 + c)`` and is calibrated from measured step times by
least squares (:meth:`QuadraticCost.fit`); any object with ``row_costs(lengths, rows, n_rows)``
can replace it.

:func:`balanced_assignment` splits a global batch of rows into ``num_bins`` groups of exactly
``bin_size`` rows (every rank must run the same number of equally shaped micro-batches) so the
heaviest group is close to the mean: the Longest-Processing-Time rule (Graham 1969, "Bounds on
multiprocessing timing anomalies") applied round by round under the cardinality constraint (each
round gives the next ``num_bins`` heaviest rows to the bins in increasing order of load), then
swaps of one row between heavy and light bins that bring the pair's loads closest, as
Karmarkar & Karp 1982 differencing does (for the heaviest/lightest pair, and vectorized over all
heavy/light pairs at once); a swap never raises the maximum. Everything is vectorized, ties break
by index, so the result is deterministic, and it is a permutation: no row dropped or repeated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

__all__ = [
    "BalanceReport",
    "CostModel",
    "QuadraticCost",
    "balance_step",
    "balanced_assignment",
    "group_by",
    "imbalance",
    "micro_batch_layout",
    "nonnegative_lstsq",
]


class CostModel(Protocol):
    def row_costs(self, lengths: np.ndarray, rows: np.ndarray, n_rows: int) -> np.ndarray:
        """Cost of each of ``n_rows`` rows; document ``j`` of length ``lengths[j]`` is in row
        ``rows[j]``."""
        ...


@dataclass(frozen=True, kw_only=True)
class QuadraticCost:
    """Per-document cost ``a*len + b*len**2 + c`` (linear layers, attention, fixed overhead).

    The default ``b`` is that of a transformer with hidden size ``h``: per token, the linear
    layers do ~``24 h^2`` FLOPs and causal attention ~``2 h len``, so ``b/a ~ 1/(12 h)``; with
    ``h = 4096`` that is ``2e-5``.
    """

    a: float = 1.0
    b: float = 2e-5
    c: float = 0.0

    def __post_init__(self):
        if min(self.a, self.b, self.c) < 0:
            raise ValueError(
                f"cost coefficients must be >= 0, got a={self.a}, b={self.b}, c={self.c}"
            )

    def doc_costs(self, lengths: np.ndarray) -> np.ndarray:
        n = np.asarray(lengths, dtype=np.float64)
        return self.a * n + self.b * n * n + self.c

    def row_costs(self, lengths: np.ndarray, rows: np.ndarray, n_rows: int) -> np.ndarray:
        return np.bincount(rows, weights=self.doc_costs(lengths), minlength=n_rows)

    @classmethod
    def fit(
        cls, step_lengths: Sequence[Sequence[int]], step_times: Sequence[float]
    ) -> QuadraticCost:
        """Least-squares fit of ``(a, b, c)`` to measured times: ``step_lengths[i]`` are the
        document lengths one rank processed in step ``i``, ``step_times[i]`` its time.
        Coefficients are clipped at 0 (and the rest refitted) so the model stays monotone."""
        if len(step_lengths) != len(step_times):
            raise ValueError(
                f"{len(step_lengths)} steps of lengths but {len(step_times)} step times"
            )
        if len(step_times) < 3:
            raise ValueError(
                f"fitting 3 coefficients needs >= 3 measured steps, got {len(step_times)}"
            )
        X = np.array(
            [
                [np.sum(n), np.sum(np.square(n, dtype=np.float64)), len(n)]
                for n in (np.asarray(s, dtype=np.float64) for s in step_lengths)
            ]
        )
        full = nonnegative_lstsq(X, np.asarray(step_times, dtype=np.float64))
        return cls(a=float(full[0]), b=float(full[1]), c=float(full[2]))


def nonnegative_lstsq(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares ``coef >= 0`` with ``X @ coef ~ y``, for cost models with a few terms:
    solve on the active columns (scaled), drop the most negative one, repeat; the dropped
    coefficients are 0."""
    active = list(range(X.shape[1]))
    while True:
        scale = np.abs(X[:, active]).max(axis=0) + 1e-30
        coef, *_ = np.linalg.lstsq(X[:, active] / scale, y, rcond=None)
        coef = coef / scale
        if (coef >= 0).all() or len(active) == 1:
            break
        active.pop(int(np.argmin(coef)))
    full = np.zeros(X.shape[1])
    full[active] = np.maximum(coef, 0.0)
    return full


def group_by(labels: np.ndarray, num_labels: int) -> np.ndarray:
    """Indices sorted by ``labels`` (in ``[0, num_labels)``), in index order within a label:
    ``np.argsort(labels, kind="stable")``, on 16-bit keys when they fit, which numpy sorts by
    radix (tens of times faster than 64-bit keys)."""
    keys = np.asarray(labels)
    if num_labels <= 1 << 16:
        keys = keys.astype(np.uint16)
    return np.argsort(keys, kind="stable")


def imbalance(loads: np.ndarray) -> float:
    """``max / mean`` of per-rank loads (1.0 is perfect)."""
    loads = np.asarray(loads, dtype=np.float64)
    mean = loads.mean()
    return float(loads.max() / mean) if mean > 0 else 1.0


def balanced_assignment(
    costs: np.ndarray, num_bins: int, *, refine_steps: int | None = None
) -> np.ndarray:
    """Bin of each item: ``len(costs) / num_bins`` items per bin, max bin load near the mean.

    ``refine_steps`` (default 4) bounds the swap passes after the greedy rounds; 0 skips them.
    """
    costs = np.asarray(costs, dtype=np.float64)
    n = costs.size
    if num_bins < 1 or n % num_bins:
        raise ValueError(
            f"{n} rows cannot be split evenly over {num_bins} bins: make the global batch a "
            "multiple of dp_size * micro_batches * micro_batch_rows"
        )
    if num_bins == 1:  # what the rounds and swaps below give for one bin, without the work
        return np.zeros(n, dtype=np.int64)
    k = n // num_bins
    order = np.argsort(-costs, kind="stable")  # heaviest first, ties by index
    bins_of = np.empty((k, num_bins), dtype=np.int64)  # bins_of[r, i]: bin of round r's i-th item
    loads = np.zeros(num_bins)
    arange = np.arange(num_bins)
    for r in range(k):
        by_load = np.lexsort((arange, loads))  # lightest bin first, ties by bin id
        bins_of[r] = by_load
        loads[by_load] += costs[order[r * num_bins : (r + 1) * num_bins]]
    assignment = np.empty(n, dtype=np.int64)
    assignment[order] = bins_of.reshape(-1)
    steps = 4 if refine_steps is None else refine_steps
    if k > 1 and steps > 0:
        _refine(costs, assignment, loads, steps)
    return assignment


def _refine(costs: np.ndarray, assignment: np.ndarray, loads: np.ndarray, steps: int) -> None:
    """Improve by swaps of one row between two bins, never raising the maximum load.

    Single swaps between the heaviest and the lightest bin; then vectorized passes that pair the
    i-th heaviest bin with the i-th lightest and make, in every pair at once, the swap that
    brings the two loads closest; then single swaps again. At most ``steps`` of each.
    """
    nb = loads.size
    members = group_by(assignment, nb).reshape(nb, -1)  # bin -> its rows
    k = members.shape[1]
    half = nb // 2
    _swap_max_min(costs, members, loads, steps)
    for _ in range(steps):
        # Only bins above the mean can hold the maximum: pair those with the lightest ones.
        m = min(half, int((loads > loads.mean() * (1 + 1e-9)).sum()))
        if m == 0:
            break
        by_load = np.argsort(loads, kind="stable")
        hi, lo = by_load[::-1][:m], by_load[:m]
        gap = loads[hi] - loads[lo]
        delta = costs[members[hi]][:, :, None] - costs[members[lo]][:, None, :]
        ok = (delta > 0) & (delta < gap[:, None, None])
        score = np.where(ok, np.abs(delta - gap[:, None, None] / 2), np.inf).reshape(m, -1)
        best = np.argmin(score, axis=1)
        useful = np.isfinite(score[np.arange(m), best])
        if not useful.any():
            break
        hi, lo, best = hi[useful], lo[useful], best[useful]
        i, j = np.divmod(best, k)
        a, b = members[hi, i], members[lo, j]
        d = costs[a] - costs[b]
        members[hi, i], members[lo, j] = b, a
        loads[hi] -= d
        loads[lo] += d
    _swap_max_min(costs, members, loads, steps)
    assignment[members.reshape(-1)] = np.repeat(np.arange(nb), k)


def _swap_max_min(costs: np.ndarray, members: np.ndarray, loads: np.ndarray, steps: int) -> None:
    """Up to ``steps`` swaps between the heaviest and the lightest bin, each the one bringing
    their loads closest; stops when no swap lowers the heavier one."""
    k = members.shape[1]
    for _ in range(steps):
        hi, lo = int(np.argmax(loads)), int(np.argmin(loads))
        gap = loads[hi] - loads[lo]
        delta = costs[members[hi]][:, None] - costs[members[lo]][None, :]
        score = np.where((delta > 0) & (delta < gap), np.abs(delta - gap / 2), np.inf)
        flat = int(np.argmin(score))
        if not np.isfinite(score.flat[flat]):
            return
        i, j = divmod(flat, k)
        a, b = members[hi, i], members[lo, j]
        members[hi, i], members[lo, j] = b, a
        loads[hi] -= delta[i, j]
        loads[lo] += delta[i, j]


@dataclass(frozen=True, kw_only=True)
class BalanceReport:
    """Max/mean rank cost of one step, for the stream order and for the balanced order."""

    naive: float
    balanced: float


def balance_step(
    row_costs: np.ndarray,
    *,
    dp_size: int,
    micro_batches: int,
    rank: int | None = None,
    refine_steps: int | None = None,
) -> tuple[np.ndarray, BalanceReport]:
    """Order the rows of one global batch for ``dp_size`` ranks x ``micro_batches``.

    Returns ``layout`` of shape ``(dp_size, micro_batches, rows_per_micro_batch)`` holding row
    indices into ``row_costs`` (a permutation of them), and the imbalance before/after. The naive
    layout, used for the report, is the contiguous split of the stream order. With ``rank``, only
    that rank's micro-batches are split (``layout[rank]`` is filled, the others are -1): each rank
    computes the same rank assignment and then only its own micro-batch order.
    """
    row_costs = np.asarray(row_costs, dtype=np.float64)
    n = row_costs.size
    per_rank, rem = divmod(n, dp_size)
    per_micro, rem2 = divmod(per_rank, micro_batches)
    if rem or rem2 or per_micro == 0:
        raise ValueError(
            f"a global batch of {n} rows does not split into dp_size={dp_size} x "
            f"micro_batches={micro_batches} equal micro-batches: use a multiple of "
            f"{dp_size * micro_batches} rows"
        )
    if rank is not None and not 0 <= rank < dp_size:
        raise ValueError(f"rank {rank} is outside [0, dp_size={dp_size})")
    if dp_size == 1:  # one rank holds every row: only the micro-batches are balanced
        ratio = imbalance(row_costs.sum(keepdims=True))
        layout = np.arange(n).reshape(1, micro_batches, per_micro)
        if micro_batches > 1:
            micro_of = balanced_assignment(row_costs, micro_batches)
            layout[0] = group_by(micro_of, micro_batches).reshape(micro_batches, per_micro)
        return layout, BalanceReport(naive=ratio, balanced=ratio)
    naive = imbalance(row_costs.reshape(dp_size, per_rank).sum(axis=1))
    rank_of = balanced_assignment(row_costs, dp_size, refine_steps=refine_steps)
    rank_loads = np.bincount(rank_of, weights=row_costs, minlength=dp_size)
    layout = micro_batch_layout(row_costs, rank_of, dp_size, micro_batches, rank)
    return layout, BalanceReport(naive=naive, balanced=imbalance(rank_loads))


def micro_batch_layout(
    row_costs: np.ndarray, rank_of: np.ndarray, dp_size: int, micro_batches: int, rank: int | None
) -> np.ndarray:
    """``(dp_size, micro_batches, rows_per_micro_batch)`` row indices: each rank's rows (in row
    order, ``rank_of`` gives every row's rank) split into balanced micro-batches; with ``rank``
    only that rank's entries are filled, the others are -1."""
    per_rank = row_costs.size // dp_size
    per_micro = per_rank // micro_batches
    layout = np.full((dp_size, micro_batches, per_micro), -1, dtype=np.int64)
    by_rank = group_by(rank_of, dp_size).reshape(dp_size, per_rank)
    for r in range(dp_size) if rank is None else [rank]:
        rows = by_rank[r]
        if micro_batches == 1:
            layout[r, 0] = rows
            continue
        micro_of = balanced_assignment(row_costs[rows], micro_batches)
        layout[r] = rows[group_by(micro_of, micro_batches)].reshape(micro_batches, per_micro)
    return layout
