"""Timing and memory measurement shared by the benchmark scripts and the FP8 calibration.

GPU timings use CUDA events around each run, optionally after overwriting a buffer larger than
the L2 cache (so a memory-bound kernel is measured from HBM, not from cache), and report the
median; elsewhere wall-clock time is used. Nothing here runs at import time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["copy_bandwidth_gbps", "peak_memory_mib", "synchronize", "time_ms"]

#: Larger than the L2 cache of an H100/H200 (50/60 MB).
_L2_FLUSH_BYTES = 256 * 2**20


def synchronize(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], object],
    device: torch.device | str,
    *,
    warmup: int = 3,
    iters: int = 10,
    flush_l2: bool = True,
) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` runs after ``warmup`` runs."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device) if flush_l2 else None
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for start, end in zip(starts, ends, strict=True):
            if flush is not None:
                flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_memory_mib(fn: Callable[[], object], device: torch.device | str) -> float | None:
    """Peak memory allocated during one ``fn()`` beyond what was allocated before (CUDA only)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    synchronize(device)
    del out
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def copy_bandwidth_gbps(device: torch.device | str, *, smoke: bool = False) -> float:
    """Attainable memory bandwidth: GB/s of a large device-to-device copy (read + write)."""
    nbytes = (16 if smoke else 2048) * 2**20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, iters=5 if smoke else 30)
    return 2 * nbytes / (ms * 1e-3) / 1e9
