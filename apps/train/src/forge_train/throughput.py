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

# Dense bf16 peak FLOP/s per device (NVIDIA datasheets, without sparsity), matched against
# ``torch.cuda.get_device_name``: the first row whose words all occur in the name, so the
# PCIe and NVL boards (lower clocks and power) come before their SXM parts' rows
# ("NVIDIA H100 80GB HBM3" is the SXM, "NVIDIA H100 PCIe" / "NVIDIA H100 NVL" the others).
_PEAK_BF16: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H100", "PCIe"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H100",), 989e12),
    (("H200", "NVL"), 835e12),
    (("H200",), 989e12),
    (("H800", "PCIe"), 756e12),
    (("H800",), 989e12),
    (("A100",), 312e12),
    (("B200",), 2250e12),
)


def known_peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU by its name; ``None`` for an unknown one."""
    for words, value in _PEAK_BF16:
        if all(word in device_name for word in words):
            return value
    return None


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
