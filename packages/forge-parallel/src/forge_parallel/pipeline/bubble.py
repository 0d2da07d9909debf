"""Pipeline bubble: the fraction of a step a rank sits idle, computed and measured.

Computed, for ``p`` pipeline ranks, ``m`` micro-batches and ``v`` virtual stages per rank, with
``F``, ``B``, ``W`` the times of a stage's forward, input-gradient and weight-gradient passes
(equal by default), as idle time / (idle + compute ``m (F + B + W)``) per rank:

- GPipe (Huang et al. 2019) and 1F1B (Narayanan et al. 2021): ``(p - 1) / (m + p - 1)``;
- interleaved 1F1B (Narayanan et al. 2021, arXiv:2104.04473): the warm-up shrinks ``v``-fold,
  ``(p - 1) / (v m + p - 1)``;
- ZB-H1 (Qi et al. 2023, arXiv:2401.10241, section 3): weight-gradient passes fill the
  cool-down, idle ``(p - 1)(F + B - W)``, so ``(p - 1) / (3 m + p - 1)`` when ``F = B = W``;
  with ``v`` interleaved stages the idle time is divided by ``v`` as for interleaved 1F1B;
- ZB-V (same paper, section 6; chunks of half a stage): idle ``(p - 1)(F + B - 2 W) / 2``,
  zero when ``F = B = W`` and ``m >= 2 p``.

Measured: each rank's time inside stage compute (``PipelineStage`` forward, backward and
weight-gradient calls) against the wall time of the step, from a real run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from forge_parallel.pipeline.config import PipelineConfig

if TYPE_CHECKING:
    from forge_parallel.pipeline.schedule import Pipeline

__all__ = ["BubbleReport", "bubble_fraction", "measure_bubble"]


def bubble_fraction(
    schedule: str,
    *,
    pp: int,
    microbatches: int,
    virtual_stages: int = 1,
    t_f: float = 1.0,
    t_b: float = 1.0,
    t_w: float = 1.0,
) -> float:
    """The analytic idle fraction of each rank for ``schedule`` (see the module docstring)."""
    config = PipelineConfig(
        schedule=schedule, microbatches=microbatches, virtual_stages=virtual_stages
    )
    if min(t_f, t_b, t_w) < 0:
        raise ValueError(f"pass times >= 0, got t_f={t_f}, t_b={t_b}, t_w={t_w}")
    p, m, v = pp, config.microbatches, config.virtual_stages
    compute = m * (t_f + t_b + t_w)
    if schedule in ("gpipe", "1f1b"):
        idle = (p - 1) * (t_f + t_b + t_w)
    elif schedule == "interleaved_1f1b":
        idle = (p - 1) * (t_f + t_b + t_w) / v
    elif schedule == "zero_bubble":
        idle = (p - 1) * max(t_f + t_b - t_w, 0.0) / v
    elif schedule == "zbv":
        idle = (p - 1) * max(t_f + t_b - 2 * t_w, 0.0) / 2
    else:  # pragma: no cover - PipelineConfig rejects unknown names
        raise AssertionError(schedule)
    return idle / (idle + compute) if idle + compute > 0 else 0.0


@dataclass(frozen=True)
class BubbleReport:
    """Computed and measured bubble of one schedule (measured: mean over pipeline ranks)."""

    schedule: str
    pp: int
    microbatches: int
    virtual_stages: int
    computed: float
    measured: float
    per_rank: tuple[float, ...]
    step_seconds: float


_TIMED = ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk")


def measure_bubble(
    pipe: Pipeline,
    inputs: torch.Tensor,
    target: torch.Tensor,
    *,
    steps: int = 3,
    warmup: int = 1,
) -> BubbleReport:
    """Run ``warmup + steps`` steps of ``pipe`` and measure each rank's idle fraction.

    A collective on the pipeline group; gradients are dropped after each step. The computed
    value assumes equal stage costs and ``F = B = W``.
    """
    busy = [0.0]

    def timed(fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                busy[0] += time.perf_counter() - start

        return wrapper

    originals = []
    for stage in pipe.stages:
        for name in _TIMED:
            if hasattr(stage, name):
                originals.append((stage, name))
                setattr(stage, name, timed(getattr(stage, name)))
    first, last = pipe.has_first_stage, pipe.has_last_stage
    wall = 0.0
    try:
        for i in range(warmup + steps):
            dist.barrier(group=pipe.group)
            busy[0] = 0.0 if i == warmup else busy[0]
            start = time.perf_counter()
            pipe.step(*((inputs,) if first else ()), target=target if last else None)
            dist.barrier(group=pipe.group)
            if i >= warmup:
                wall += time.perf_counter() - start
            for p in pipe.parameters():
                p.grad = None
    finally:
        for stage, name in originals:
            delattr(stage, name)
    gathered: list = [None] * pipe.pp
    dist.all_gather_object(gathered, (busy[0], wall), group=pipe.group)
    step_wall = max(w for _, w in gathered)
    per_rank = tuple(max(0.0, 1.0 - b / step_wall) for b, _ in gathered)
    config = pipe.config
    return BubbleReport(
        schedule=config.schedule,
        pp=pipe.pp,
        microbatches=config.microbatches,
        virtual_stages=config.virtual_stages,
        computed=bubble_fraction(
            config.schedule,
            pp=pipe.pp,
            microbatches=config.microbatches,
            virtual_stages=config.virtual_stages,
        ),
        measured=sum(per_rank) / len(per_rank),
        per_rank=per_rank,
        step_seconds=step_wall / steps,
    )
