"""Preemption and time limits: SIGTERM becomes a flag the loop checks after each step; every rank
then agrees to stop (checkpoint and exit) at the same step."""

from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist

__all__ = ["Preemption", "should_stop"]


class Preemption:
    """Turns SIGTERM into :attr:`requested` while the ``with`` block runs (main thread only;
    elsewhere signals are left alone)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> Preemption:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def should_stop(
    preemption: Preemption,
    *,
    started: float,
    max_minutes: float | None,
    device: torch.device,
) -> bool:
    """Whether any rank was preempted or the run is past ``max_minutes`` (collective: every rank
    calls it after each step, so all stop together; ``preemption.requested`` is then set on
    every rank)."""
    over_time = max_minutes is not None and time.perf_counter() - started > 60 * max_minutes
    flags = torch.tensor([float(preemption.requested), float(over_time)])
    if dist.is_initialized() and dist.get_world_size() > 1:
        flags = flags.to(device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        preemption.requested = bool(flags[0])
    return bool(flags.max())
