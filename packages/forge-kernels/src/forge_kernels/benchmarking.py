"""Timing, memory and peak-throughput figures shared by the benchmark scripts, forge-bench,
the training loop's MFU and the FP8 calibration.

GPU timings use CUDA events around each run, optionally after overwriting a buffer larger than
the L2 cache (so a memory-bound kernel is measured from HBM, not from cache), and report the
median; elsewhere wall-clock time is used. :func:`peak_tflops` is the one table of GPU peaks
(the denominator of every MFU / "% of peak" figure). Nothing here runs at import time.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["PEAK_TFLOPS", "copy_bandwidth_gbps", "peak_memory_mib", "peak_tflops", "synchronize",
           "time_ms"]  # fmt: skip

#: Dense (no sparsity) tensor-core TFLOP/s per GPU, ``(bf16, fp8)``, from NVIDIA's datasheets
#: (their figures marked "with sparsity" halved); ``None``: no FP8 tensor cores (Ampere).
#: Each row's name tokens must all be tokens of the device name (see :func:`peak_tflops`); the
#: first matching row wins, so a board's PCIe / NVL variants (lower clocks and power) come
#: before its SXM row, which is what "NVIDIA H100 80GB HBM3" is.
PEAK_TFLOPS: tuple[tuple[tuple[str, ...], float, float | None], ...] = (
    (("H100", "PCIE"), 756.0, 1513.0),
    (("H100", "NVL"), 835.0, 1671.0),
    (("H100",), 989.0, 1979.0),  # SXM5
    (("H200", "NVL"), 835.0, 1671.0),
    (("H200",), 989.0, 1979.0),  # SXM
    (("GH200",), 989.0, 1979.0),  # the H100 / H200 SXM tensor cores
    (("H800", "PCIE"), 756.0, 1513.0),
    (("H800",), 989.0, 1979.0),
    (("H20",), 148.0, 296.0),
    (("GB200",), 2500.0, 5000.0),
    (("B200",), 2250.0, 4500.0),
    (("A100",), 312.0, None),  # SXM4 and PCIe alike
    (("A10G",), 70.0, None),  # AWS's A10 variant: no NVIDIA datasheet; AWS / vendor figure
    (("A10",), 125.0, None),
    (("L40S",), 362.0, 733.0),
    (("L40",), 181.0, 362.0),
    (("L4",), 121.0, 242.5),
)

_PEAK_COLUMNS = {"bf16": 1, "fp16": 1, "fp8": 2}


def peak_tflops(device_name: str, *, dtype: str = "bf16") -> float | None:
    """Dense tensor-core peak TFLOP/s of the GPU called ``device_name``
    (``torch.cuda.get_device_name()``) for ``dtype`` (``"bf16"``, ``"fp16"`` or ``"fp8"``), from
    :data:`PEAK_TFLOPS`; ``None`` for a GPU not in the table or without that precision.

    Names are compared token by token (split at spaces and dashes, any case), never as
    substrings: ``"NVIDIA L40"`` is an L40, not an L4, and ``"NVIDIA A10G"`` is not an A10.
    """
    column = _PEAK_COLUMNS.get(dtype)
    if column is None:
        raise ValueError(f"dtype must be one of {sorted(_PEAK_COLUMNS)}, got {dtype!r}")
    tokens = set(re.split(r"[^0-9A-Z]+", device_name.upper()))
    for row in PEAK_TFLOPS:
        if all(token in tokens for token in row[0]):
            return row[column]
    return None


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
