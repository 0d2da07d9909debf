"""Which layers go to which stage, and which stages to which rank (pure functions).

Layers are split into contiguous stages so that the most expensive stage is as cheap as
possible (the pipeline runs at the pace of its slowest stage): an exact dynamic programme over
the cut points, with the embedding's cost charged to the first stage and the final norm/head's
to the last. Virtual stages (several model chunks per rank, Narayanan et al. 2021,
arXiv:2104.04473) are placed round-robin (``"loop"``: stage ``s`` on rank ``s % pp``) or in the
V shape of ZB-V (Qi et al. 2023, arXiv:2401.10241: rank ``r`` holds stages ``r`` and
``2 pp - 1 - r``, so the first and last stage share a rank).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["balanced_partition", "stage_ranks", "stages_of_rank"]


def balanced_partition(
    costs: Sequence[float], num_stages: int, *, first: float = 0.0, last: float = 0.0
) -> list[tuple[int, int]]:
    """Split layers with ``costs`` into ``num_stages`` contiguous non-empty ``[start, stop)``
    ranges minimising the largest stage cost; ``first``/``last`` are added to the first/last
    stage (embedding, norm + head). Ties go to the earliest cut points (earlier stages
    smaller)."""
    n = len(costs)
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if n < num_stages:
        raise ValueError(
            f"{num_stages} stages but only {n} layers; every stage needs at least one layer"
        )
    if any(c < 0 for c in costs):
        raise ValueError(f"layer costs must be non-negative, got {list(costs)}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))

    def cost(k: int, start: int, stop: int) -> float:
        extra = (first if k == 0 else 0.0) + (last if k == num_stages - 1 else 0.0)
        return prefix[stop] - prefix[start] + extra

    inf = float("inf")
    # best[k][i]: least possible max cost of stages 0..k covering layers [0, i)
    best = [[inf] * (n + 1) for _ in range(num_stages)]
    cut = [[0] * (n + 1) for _ in range(num_stages)]
    for i in range(1, n + 1):
        best[0][i] = cost(0, 0, i)
    for k in range(1, num_stages):
        for i in range(k + 1, n + 1):
            for j in range(k, i):
                value = max(best[k - 1][j], cost(k, j, i))
                if value < best[k][i] - 1e-12 * max(1.0, abs(value)):
                    best[k][i], cut[k][i] = value, j
    bounds, stop = [], n
    for k in range(num_stages - 1, 0, -1):
        start = cut[k][stop]
        bounds.append((start, stop))
        stop = start
    bounds.append((0, stop))
    return bounds[::-1]


def stage_ranks(pp: int, virtual_stages: int, placement: str = "loop") -> list[int]:
    """The pipeline rank of each of the ``pp * virtual_stages`` stages."""
    if placement == "loop":
        return [s % pp for s in range(pp * virtual_stages)]
    if placement == "v":
        if virtual_stages != 2:
            raise ValueError(f"V placement needs virtual_stages=2, got {virtual_stages}")
        return list(range(pp)) + list(range(pp - 1, -1, -1))
    raise ValueError(f"unknown placement {placement!r}; use 'loop' or 'v'")


def stages_of_rank(rank: int, pp: int, virtual_stages: int, placement: str = "loop") -> list[int]:
    """The stage indices held by pipeline rank ``rank``, in increasing order."""
    if not 0 <= rank < pp:
        raise ValueError(f"pipeline rank {rank} is outside [0, {pp})")
    return [s for s, r in enumerate(stage_ranks(pp, virtual_stages, placement)) if r == rank]
