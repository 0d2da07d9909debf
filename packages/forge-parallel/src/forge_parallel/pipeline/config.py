"""Keyword-only configuration of pipeline parallelism, validated when constructed.

:meth:`PipelineConfig.validate` checks what needs the pipeline degree, the number of layers
and the batch size (known only when a model is split), with errors that name the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SCHEDULES", "SPLIT_MODES", "PipelineConfig"]

#: Schedule name -> (``torch.distributed.pipelining`` class, placement of virtual stages).
#: ``"loop"`` puts stage ``s`` on rank ``s % pp``; ``"v"`` puts stages ``r`` and ``2 pp - 1 - r``
#: on rank ``r`` (the V shape of ZB-V, Qi et al. 2023, arXiv:2401.10241, section 6).
SCHEDULES: dict[str, tuple[str, str]] = {
    "gpipe": ("ScheduleGPipe", "loop"),
    "1f1b": ("Schedule1F1B", "loop"),
    "interleaved_1f1b": ("ScheduleInterleaved1F1B", "loop"),
    "zero_bubble": ("ScheduleInterleavedZeroBubble", "loop"),
    "zbv": ("ScheduleZBVZeroBubble", "v"),
}
#: Schedules that run exactly one stage per rank.
SINGLE_STAGE = ("gpipe", "1f1b")
#: How layers are assigned to stages (or a tuple of layer counts, one per stage).
SPLIT_MODES = ("layers", "params", "flops")


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """Pipeline-parallel settings.

    - ``schedule``: ``"gpipe"`` (all forwards, then all backwards; Huang et al. 2019),
      ``"1f1b"`` (one forward one backward, PipeDream-Flush; Narayanan et al. 2021),
      ``"interleaved_1f1b"`` (``virtual_stages`` model chunks per rank; Narayanan et al. 2021,
      arXiv:2104.04473), ``"zero_bubble"`` (ZB-H1 with one stage per rank, its interleaved form
      with more; backward split into input- and weight-gradient passes, Qi et al. 2023,
      arXiv:2401.10241) or ``"zbv"`` (ZB-V: two stages per rank in a V shape).
    - ``microbatches``: the batch given to ``step`` is split into this many equal micro-batches
      along dim 0; ``step`` back-propagates the mean over micro-batches of ``loss_fn``.
    - ``virtual_stages``: model chunks per rank (the pipeline has ``pp * virtual_stages``
      stages).
    - ``split``: ``"layers"`` (equal layer counts), ``"params"`` (balance parameter counts,
      embedding counted on the first stage and the final norm/head on the last), ``"flops"``
      (balance forward FLOPs counted on a sample input), or a tuple with the number of layers of
      each stage.
    - ``blocks``: pattern of the repeated blocks (default: the largest ``nn.ModuleList``'s).
    """

    schedule: str = "1f1b"
    microbatches: int = 4
    virtual_stages: int = 1
    split: str | tuple[int, ...] = "layers"
    blocks: str | None = None

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"unknown pipeline schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}"
            )
        for name in ("microbatches", "virtual_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.schedule in SINGLE_STAGE and self.virtual_stages != 1:
            raise ValueError(
                f"schedule {self.schedule!r} runs one stage per rank, but virtual_stages="
                f"{self.virtual_stages}; use schedule='interleaved_1f1b', 'zero_bubble' or "
                "'zbv' for virtual stages"
            )
        if self.schedule == "zbv" and self.virtual_stages != 2:
            raise ValueError(
                f"schedule 'zbv' places exactly 2 stages per rank (a V), got virtual_stages="
                f"{self.virtual_stages}; set virtual_stages=2"
            )
        if isinstance(self.split, str):
            if self.split not in SPLIT_MODES:
                raise ValueError(
                    f"unknown split {self.split!r}; use one of {', '.join(SPLIT_MODES)} or a "
                    "tuple of layer counts, one per stage"
                )
        elif not (
            isinstance(self.split, tuple)
            and self.split
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in self.split)
        ):
            raise ValueError(
                f"split must be a mode name or a tuple of positive layer counts, got {self.split!r}"
            )

    @property
    def placement(self) -> str:
        """``"loop"`` or ``"v"``: how virtual stages are laid out over the ranks."""
        return SCHEDULES[self.schedule][1]

    def num_stages(self, pp: int) -> int:
        return pp * self.virtual_stages

    def validate(self, *, pp: int, num_layers: int, batch: int | None = None) -> None:
        """Check this config against the pipeline degree, the layer count and the batch size."""
        if not isinstance(pp, int) or pp < 1:
            raise ValueError(f"pp must be a positive integer, got {pp!r}")
        stages = self.num_stages(pp)
        if stages > num_layers:
            if self.virtual_stages == 1:
                raise ValueError(
                    f"pp={pp} stages but the model has only {num_layers} layers; every stage "
                    f"needs at least one layer: use pp <= {num_layers}"
                )
            raise ValueError(
                f"virtual_stages={self.virtual_stages} x pp={pp} = {stages} stages but the model "
                f"has only {num_layers} layers; use virtual_stages <= {max(num_layers // pp, 1)}"
            )
        if isinstance(self.split, tuple):
            if len(self.split) != stages:
                raise ValueError(
                    f"split has {len(self.split)} layer counts but the pipeline has {stages} "
                    f"stages (pp={pp} x virtual_stages={self.virtual_stages})"
                )
            if sum(self.split) != num_layers:
                raise ValueError(
                    f"split {self.split} assigns {sum(self.split)} layers but the model has "
                    f"{num_layers}"
                )
        m = self.microbatches
        if self.schedule == "1f1b" and m < stages:
            raise ValueError(
                f"schedule {self.schedule!r} needs microbatches >= the number of stages "
                f"({stages}), got microbatches={m}; use microbatches={stages} or more"
            )
        if self.schedule in ("interleaved_1f1b", "zero_bubble") and pp > 1 and m % pp != 0:
            lower = max(pp, m - m % pp)
            raise ValueError(
                f"schedule {self.schedule!r} runs micro-batches in rounds of pp={pp}: "
                f"microbatches={m} is not a multiple of {pp}; use {lower} or {lower + pp}"
            )
        if batch is not None and batch % m != 0:
            raise ValueError(
                f"batch size {batch} is not divisible by microbatches={m}; use a batch that is a "
                f"multiple of {m} or microbatches that divide {batch}"
            )
