"""``forge-report RUN_DIR``: plot a run's ``metrics.jsonl`` to PNG files.

Writes ``loss.png`` (training loss per step and the held-out loss), ``throughput.png``
(tokens/s, and MFU where the peak FLOP/s was known) and ``memory.png`` (peak device memory)
into ``RUN_DIR/report`` (or ``--out``). A resumed run appends to the same file; the steps it
re-ran replace the older rows. Needs matplotlib: ``pip install 'forge-train[report]'``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["ReportError", "main", "read_metrics", "write_report"]


class ReportError(ValueError):
    """The run folder has no usable metrics."""


def _after_restart(rows: list[dict[str, Any]], step: int) -> list[dict[str, Any]]:
    return [r for r in rows if r["step"] < step]


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(training rows, held-out rows)`` of a ``metrics.jsonl``, each in step order. A row
    whose step is not past the previous training row's starts a resumed run: the rows of the
    steps it re-runs are dropped."""
    train: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReportError(f"{path}:{lineno}: not a JSON line ({exc})") from exc
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ReportError(f"{path}:{lineno}: a metrics row needs an integer 'step'")
        if "loss" in row:
            if train and row["step"] <= train[-1]["step"]:  # a resumed run starts again here
                train = _after_restart(train, row["step"])
                evals = _after_restart(evals, row["step"])
            train.append(row)
        elif "eval_loss" in row:
            evals = [r for r in evals if r["step"] != row["step"]] + [row]
    return train, evals


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [s for s, _ in points], [v for _, v in points]


def _figure(title: str, ylabel: str):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(7, 4), dpi=100, layout="tight")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Plot ``run_dir/metrics.jsonl``; returns the PNG paths written. ``ReportError`` for a
    folder without usable metrics, ``ImportError`` (naming the extra) without matplotlib."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ReportError(
            f"{run_dir} has no metrics.jsonl: pass the folder of a forge-train run "
            "(its train.output_dir; metrics.jsonl is written unless logging.jsonl=false)"
        )
    train, evals = read_metrics(metrics)
    if not train:
        raise ReportError(
            f"{metrics} has no training rows yet (they are written every logging.log_every steps)"
        )
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "forge-report needs matplotlib: pip install 'forge-train[report]'"
        ) from exc
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = _figure(f"loss ({run_dir.name})", "loss per token")
    ax.plot(*_series(train, "loss"), label="train", color="tab:blue")
    steps, values = _series(evals, "eval_loss")
    if steps:
        # Without a validation set the loop evaluates training batches (eval_split "train").
        held_out = all(r.get("eval_split", "val") == "val" for r in evals)
        label = "held-out" if held_out else "eval on training batches (no validation set)"
        ax.plot(steps, values, "o--", label=label, color="tab:orange")
    ax.legend()
    written.append(_save(fig, out / "loss.png"))

    fig, ax = _figure(f"throughput ({run_dir.name})", "tokens/s")
    # Input (non-padding) tokens per second, the work MFU counts (forge_train.throughput).
    ax.plot(*_series(train, "tokens_per_s"), color="tab:green", label="input tokens/s")
    steps, values = _series(train, "mfu")
    if steps:
        mfu_ax = ax.twinx()
        mfu_ax.plot(steps, [100 * v for v in values], color="tab:red", label="MFU")
        mfu_ax.set_ylabel("MFU (%)")
        mfu_ax.legend(loc="lower right")
    ax.legend(loc="lower left")
    written.append(_save(fig, out / "throughput.png"))

    fig, ax = _figure(f"memory ({run_dir.name})", "peak allocated (GB)")
    ax.plot(*_series(train, "memory_gb"), color="tab:purple")
    written.append(_save(fig, out / "memory.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.savefig(path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="forge-report",
        description="Plot a forge-train run's loss, throughput and memory curves to PNG.",
    )
    parser.add_argument("run_dir", help="the run folder (train.output_dir) with metrics.jsonl")
    parser.add_argument("--out", default=None, help="output folder (default: RUN_DIR/report)")
    args = parser.parse_args(argv)
    try:
        paths = write_report(args.run_dir, args.out)
    except ReportError as exc:
        print(f"forge-report: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"forge-report: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
