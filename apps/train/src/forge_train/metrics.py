"""Where a run's metrics go: the console (a ``rich`` live line on a terminal, plain lines
otherwise), ``metrics.jsonl`` in the run folder, and TensorBoard when it is installed.

MFU (model FLOPs utilization, Chowdhery et al. 2022, PaLM, appendix B) is
``tokens/s x flops_per_token / (devices x peak FLOP/s)``, with ``forge_models.flops_per_token``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from forge_train.config import LoggingConfig

__all__ = ["MetricsLogger", "peak_flops"]

# Dense bf16 peak FLOP/s per device (vendor datasheets).
_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "B200": 2250e12}


def peak_flops(config: LoggingConfig, device: torch.device) -> float | None:
    """Peak FLOP/s of one device: ``logging.peak_tflops``, else known GPUs, else ``None``."""
    if config.peak_tflops is not None:
        return config.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in _PEAK_BF16.items():
            if key in name:
                return value
    return None


def _format(row: dict[str, Any]) -> str:
    parts = [f"step {row['step']:5d}", f"loss {row['loss']:.4f}", f"lr {row['lr']:.2e}"]
    parts.append(f"grad norm {row['grad_norm']:.3f}")
    parts.append(f"{row['tokens_per_s']:,.0f} tok/s")
    if row.get("mfu") is not None:
        parts.append(f"MFU {100 * row['mfu']:.1f}%")
    parts.append(f"mem {row['memory_gb']:.2f} GB")
    return " | ".join(parts)


class MetricsLogger:
    """Console + JSONL + TensorBoard for the main process (a no-op on the others)."""

    def __init__(self, config: LoggingConfig, run_dir: Path | None, *, enabled: bool) -> None:
        self.enabled = enabled
        self.config = config
        self._jsonl = None
        self._tb = None
        self._live = None
        if not enabled:
            return
        use_rich = config.progress == "rich" or (config.progress == "auto" and sys.stdout.isatty())
        if use_rich:
            from rich.console import Console
            from rich.live import Live

            self._console = Console()
            self._live = Live("", console=self._console, refresh_per_second=4, transient=False)
            self._live.start()
        if run_dir is not None and config.jsonl:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if run_dir is not None and config.tensorboard != "false":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                if config.tensorboard == "true":
                    raise ImportError(
                        "logging.tensorboard=true needs tensorboard: pip install "
                        "'forge-train[tensorboard]'"
                    ) from exc
            else:
                self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def message(self, text: str) -> None:
        """A line above the live display (or a plain line)."""
        if not self.enabled:
            return
        if self._live is not None:
            self._live.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)

    def log(self, row: dict[str, Any], *, show: bool) -> None:
        """Record ``row`` (JSONL, TensorBoard); show it on the console when ``show``."""
        if not self.enabled:
            return
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for key, value in row.items():
                if isinstance(value, int | float) and key != "step":
                    self._tb.add_scalar(key, value, row["step"])
        if self._live is not None:
            self._live.update(_format(row))
        elif show:
            print(_format(row), flush=True)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
