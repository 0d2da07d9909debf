"""Throughput figures of the loop: tokens/s, MFU and peak memory, per log row and for the
``--benchmark`` summary line.

MFU (model FLOPs utilization, Chowdhery et al. 2022, PaLM, appendix B) is
``tokens/s x flops_per_token / (devices x peak FLOP/s)``, with ``forge_models.flops_per_token``;
tokens/s counts the input tokens the model processes (every non-padding position), not only the
predicted (loss) tokens: with an assistant-only SFT loss those are a fraction of the work.
"""

from __future__ import annotations

import torch

from forge_train.config import LoggingConfig

__all__ = ["benchmark_line", "known_peak_flops", "mfu", "peak_flops", "peak_memory_gb"]


def known_peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU by its ``torch.cuda.get_device_name``; ``None`` for an
    unknown one. The table is forge-kernels' (:func:`forge_kernels.benchmarking.peak_tflops`,
    shared with forge-bench and the kernel benchmarks)."""
    from forge_kernels.benchmarking import peak_tflops

    tflops = peak_tflops(device_name, dtype="bf16")
    return None if tflops is None else tflops * 1e12


def peak_flops(config: LoggingConfig, device: torch.device) -> float | None:
    """Peak FLOP/s of one device: ``logging.peak_tflops``, else known GPUs, else ``None``."""
    if config.peak_tflops is not None:
        return config.peak_tflops * 1e12
    if device.type == "cuda":
        return known_peak_flops(torch.cuda.get_device_name(device))
    return None


def mfu(
    tokens_per_s: float, flops_per_token: float, world_size: int, peak: float | None
) -> float | None:
    """Model FLOPs utilization in [0, 1]; ``None`` without a known peak."""
    if peak is None:
        return None
    return tokens_per_s * flops_per_token / (world_size * peak)


def peak_memory_gb(accelerator) -> float:
    return accelerator.memory_stats()["peak_allocated"] / 2**30


def benchmark_line(
    *,
    n_params: int,
    device_name: str,
    world_size: int,
    precision: str,
    steps: int,
    elapsed: float,
    tokens_per_s: float,
    mfu_value: float | None,
    memory_gb: float,
) -> str:
    """The one summary line of ``forge-train --benchmark``."""
    mfu_text = f"{100 * mfu_value:.1f}%" if mfu_value is not None else "n/a"
    return (
        f"benchmark | {n_params / 1e6:.1f}M params | {device_name} x {world_size} | "
        f"{precision} | {steps} steps | {1000 * elapsed / max(steps, 1):.1f} ms/step | "
        f"{tokens_per_s:,.0f} tokens/s | MFU {mfu_text} | peak memory {memory_gb:.2f} GB"
    )
