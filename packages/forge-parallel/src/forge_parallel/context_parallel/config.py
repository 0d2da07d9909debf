"""Keyword-only configuration of context parallelism."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CP_STYLES", "CPConfig"]

#: Accepted values of ``CPConfig(style=...)``.
CP_STYLES = ("ring", "ulysses")


@dataclass(frozen=True, kw_only=True)
class CPConfig:
    """Context (sequence-dimension) parallelism of attention.

    ``style="ring"``: ring attention (Liu et al. 2023, arXiv:2310.01889); K/V blocks travel
    around the context-parallel ranks, any number of heads. ``style="ulysses"``: DeepSpeed-Ulysses
    (Jacobs et al. 2023, arXiv:2309.14509); all-to-all from sequence to head sharding, needs the
    query and key/value head counts divisible by the CP degree.

    ``load_balance=True`` shards each sequence in ``2 * cp`` chunks, rank ``r`` holding chunks
    ``r`` and ``2 * cp - 1 - r`` (the "zigzag" layout of Megatron-Core CP and the Llama 3
    paper), so every rank does the same causal-attention work; ``False`` gives rank ``r`` the
    ``r``-th contiguous ``1 / cp`` of the sequence. Inputs, labels and position ids must be
    sharded with the same layout (:func:`~forge_parallel.context_parallel.shard_sequence`).
    """

    style: str = "ring"
    load_balance: bool = True

    def __post_init__(self) -> None:
        if self.style not in CP_STYLES:
            raise ValueError(
                f"unknown context-parallel style {self.style!r}; use one of {', '.join(CP_STYLES)}"
            )
        if not isinstance(self.load_balance, bool):
            raise ValueError(f"load_balance must be True or False, got {self.load_balance!r}")
