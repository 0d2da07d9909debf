"""Keyword-only configuration of expert parallelism (:func:`~forge_parallel.expert_parallel.apply_ep`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = ["ETP_STYLES", "EPConfig"]

#: How an expert weight is split over the expert-tensor-parallel (``etp``) ranks. Expert weights
#: are stacked ``[experts, out, in]`` (``nn.Linear`` layout per expert):
#: ``"colwise"`` splits ``out`` (dim 1), ``"colwise_packed"`` splits each of the two packed
#: halves of ``out`` (``[gate; up]`` -> ``[gate_r; up_r]``), ``"rowwise"`` splits ``in`` (dim 2)
#: and leaves a partial sum that is reduced over ``etp``.
ETP_STYLES = ("colwise", "colwise_packed", "rowwise")

_DEFAULT_ETP = MappingProxyType({"gate_up_proj": "colwise_packed", "down_proj": "rowwise"})


@dataclass(frozen=True, kw_only=True)
class EPConfig:
    """Expert parallelism (experts sharded over ``mesh["ep"]``, tokens moved by all-to-all).

    ``experts``: module path pattern of the experts modules (segment by segment, ``*`` within
    one, as in tensor-parallel plans), e.g. ``"layers.*.mlp.experts"``. Each must follow the
    :class:`~forge_parallel.expert_parallel.ExpertsModule` protocol.

    ``num_chunks``: split each dispatch into this many chunks (every expert's rows split
    evenly), so the all-to-all of chunk ``i + 1`` is in flight while the experts compute chunk
    ``i`` and the combine of chunk ``i`` overlaps the computation of chunk ``i + 1``. ``1``: one
    blocking exchange each way. Results are the same either way.

    ``etp_styles``: parameter name -> one of :data:`ETP_STYLES`, used when ``etp > 1`` (expert
    tensor parallelism, Megatron-Core's ``expert_tensor_parallel_size``). The defaults fit
    :class:`forge_models.blocks.moe.MoEExperts` (stacked ``gate_up_proj`` / ``down_proj``).

    ``sequence_parallel`` (with ``etp > 1``): the ``etp`` ranks route different tokens (each
    its sequence-parallel shard) instead of the same ones. After the expert-parallel dispatch
    the rows are gathered over ``etp`` (each rank's share of every expert is then computed on
    all of them) and the partial outputs are reduce-scattered back to the rows' ranks, as
    Megatron-Core's all-to-all token dispatcher does under sequence parallelism.
    """

    experts: str = "layers.*.mlp.experts"
    num_chunks: int = 1
    etp_styles: Mapping[str, str] = field(default_factory=lambda: _DEFAULT_ETP)
    #: ``True``: a model whose modules ``experts`` does not match is left as it is instead of
    #: raising (a pipeline stage holding only dense layers; ``pipeline(stage_parallel=...)``
    #: sets it for every stage).
    missing_ok: bool = False
    sequence_parallel: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.experts, str) or not self.experts:
            raise ValueError(
                f"experts must be a module path pattern such as 'layers.*.mlp.experts', got "
                f"{self.experts!r}"
            )
        if not isinstance(self.num_chunks, int) or isinstance(self.num_chunks, bool):
            raise ValueError(f"num_chunks must be a positive integer, got {self.num_chunks!r}")
        if self.num_chunks < 1:
            raise ValueError(f"num_chunks must be >= 1 (1: no overlap), got {self.num_chunks}")
        bad = {k: v for k, v in self.etp_styles.items() if v not in ETP_STYLES}
        if bad:
            raise ValueError(
                f"unknown expert-tensor-parallel styles {bad}; use one of {', '.join(ETP_STYLES)}"
            )
        if self.etp_styles and "rowwise" not in self.etp_styles.values():
            raise ValueError(
                "etp_styles needs one 'rowwise' weight (the experts' output projection) so "
                f"their output is a partial sum reduced over etp; got {dict(self.etp_styles)}"
            )
        object.__setattr__(self, "etp_styles", MappingProxyType(dict(self.etp_styles)))
