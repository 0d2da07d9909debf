"""Where a run's metrics go: the console (a ``rich`` live line on a terminal, plain lines
otherwise), ``metrics.jsonl`` in the run folder, TensorBoard when it is installed, and the
W&B / MLflow trackers when enabled (:mod:`forge_train.trackers`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from forge_train.config import LoggingConfig
from forge_train.trackers import build_trackers

__all__ = ["MetricsLogger"]


def _format(row: dict[str, Any]) -> str:
    parts = [f"step {row['step']:5d}", f"loss {row['loss']:.4f}"]
    # Multi-token prediction depths' losses (mtp_1_loss, ...), beside the next-token loss.
    parts += [f"{key[:-5]} {value:.4f}" for key, value in row.items() if key.startswith("mtp_")]
    parts.append(f"lr {row['lr']:.2e}")
    parts.append(f"grad norm {row['grad_norm']:.3f}")
    parts.append(f"{row['tokens_per_s']:,.0f} tok/s")
    if row.get("mfu") is not None:
        parts.append(f"MFU {100 * row['mfu']:.1f}%")
    parts.append(f"mem {row['memory_gb']:.2f} GB")
    if row.get("data_wait_s") is not None:
        parts.append(f"data wait {row['data_wait_s']:.3f} s")
    return " | ".join(parts)


class MetricsLogger:
    """Console + JSONL + TensorBoard + trackers for the main process (a no-op on the others).

    ``run_config`` (the resolved config as plain data) is handed to the trackers once.
    ``metrics.jsonl`` (appended to: a resumed run's rows follow its earlier ones) and the
    TensorBoard writer are opened at the first row, so a run that stops before its first step
    (e.g. a checkpoint it cannot resume) leaves the run folder as it found it; whose folder it
    is was settled before (:func:`forge_train.rundir.prepare_run_dir`).
    """

    def __init__(
        self,
        config: LoggingConfig,
        run_dir: Path | None,
        *,
        enabled: bool,
        run_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.enabled = enabled
        self.config = config
        self._jsonl = None
        self._tb = None
        self._run_dir = run_dir
        self._tb_class = None  # torch's SummaryWriter, when TensorBoard logging is on
        self._opened = False
        self._live = None
        self._trackers = []
        if not enabled:
            return
        self._trackers = build_trackers(config, run_config or {}, run_dir)
        use_rich = config.progress == "rich" or (config.progress == "auto" and sys.stdout.isatty())
        if use_rich:
            from rich.console import Console
            from rich.live import Live

            self._console = Console()
            self._live = Live("", console=self._console, refresh_per_second=4, transient=False)
            self._live.start()
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
                self._tb_class = SummaryWriter

    def _open(self) -> None:
        """Open ``metrics.jsonl`` and the TensorBoard writer (at the first row)."""
        run_dir, self._opened = self._run_dir, True
        if run_dir is None:
            return
        if self.config.jsonl:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if self._tb_class is not None:
            self._tb = self._tb_class(log_dir=str(run_dir / "tensorboard"))

    def message(self, text: str) -> None:
        """A line above the live display (or a plain line)."""
        if not self.enabled:
            return
        if self._live is not None:
            self._live.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)

    def log(self, row: dict[str, Any], *, show: bool) -> None:
        """Record ``row`` (JSONL, TensorBoard, trackers); show it on the console when ``show``."""
        if not self.enabled:
            return
        for tracker in self._trackers:
            tracker.log(row)
        if not self._opened:
            self._open()
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
        for tracker in self._trackers:
            tracker.finish()
        self._trackers = []
        if self._live is not None:
            self._live.stop()
            self._live = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
