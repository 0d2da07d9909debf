"""Train a vision-language model with forge-train on ``data=vlm-shards`` and report its
throughput: tokens/s and MFU (vision encoder and projector counted, ``forge_train.throughput``)
from the run's ``metrics.jsonl``, and how long each step waited for the data loader.

::

    uv run python apps/train/benchmarks/make_vlm_shards.py --out /tmp/vlm-shards
    uv run python apps/train/benchmarks/bench_vlm_train.py --shards /tmp/vlm-shards   # a GPU
    uv run python apps/train/benchmarks/bench_vlm_train.py --shards /tmp/vlm-shards --smoke

The run is ``forge-train recipe=vlm data=vlm-shards`` in this process (``forge_train.trainer``,
as the CLI runs it), built from the config with random initialization: ``--model``
(``qwen2_5-vl-3b``: Qwen2.5-VL-3B's shape, 3.75B parameters) in ``--precision`` (bf16
autocast), vision tower frozen (the recipe's ``train.freeze=[vision]``), ``--rows`` packed rows
of ``--seq-len`` tokens per step in micro-batches of ``--micro-rows``, images capped at
``--max-tiles`` attention windows (80 windows of 112 px: 1,003,520 pixels, Qwen2.5-VL's usual
``max_pixels``), the demo tokenizer (no network; its token ids replace the preset's).
No evaluation, no checkpoint, no export: only the steps.

Memory of the default, one H100 (78 GiB usable): AdamW keeps fp32 weights, gradients and two
moments, 16 bytes per trained parameter: 3.12B (language model + projector) x 16 = 50.0 GB, plus
the frozen encoder's fp32 weights (0.63B x 4 = 2.5 GB): 48.9 GiB before any activation. Measured
on a CPU (bf16 autocast, saved tensors of one Qwen2.5-3B block at 512 tokens): 0.10 GiB of
activations per block per 512 tokens (a little of it the CPU attention's probabilities, which a
GPU's fused attention does not keep) plus 0.14 GiB of bf16 weight copies, so a 4096-token row
without recompute keeps 36 x (0.7 to 0.8 + 0.14) = 30-34 GiB: 79-83 GiB in all, over the card.
With ``parallel.recompute=full`` (the default here) a block keeps its input only (36 x 4096 x
2048 values, about 1 GiB), so the run needs about 55-60 GiB at its peak (the bf16 weight
copies, the recomputed block and the loss over the 151,936-token vocabulary on top of the
weights and optimizer state).

The data loader's wait: forge-train logs its mean per window (``data_wait_s`` in
``metrics.jsonl``); for each step's wait (the first apart, the most in a window), the images per
step and the ``--deadline`` stop, this script wraps the run's loader (replacing
``build_components`` in ``forge_train.loop`` for this process) and times each ``next()``: the
seconds a step waited for its batch (with ``data.prefetch_buffers``
the next buffers are decoded by a background thread while the steps run). The interval between
two ``next()`` calls is the step's wall time (the step ends with the loss on the host). The
first step's wait decodes the first packing buffer with nothing ahead and is shown apart.

Printed: forge-train's own log rows; after each window of ``--log-every`` steps the loader's
wall and wait seconds per step; at the end a table joining each metrics row with its window and
the medians of the windows after the first (which holds the warm-up). ``--deadline`` seconds
after the start, the run stops at the next step (the summary is still printed; exit 0), so an
outer ``timeout`` never cuts the figures off. Exit status 3: CUDA ran out of memory (the log
says what was allocated); 2: a bad configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GPU_DEFAULTS: dict[str, Any] = {
    "model": "qwen2_5-vl-3b", "seq_len": 4096, "rows": 8, "micro_rows": 1, "steps": 40,
    "log_every": 5, "max_tiles": 80, "pack_buffer": 128, "precision": "bf16",
    "recompute": "full",
}  # fmt: skip
#: --smoke: the tiny Qwen2.5-VL on a CPU, in well under a minute.
SMOKE: dict[str, Any] = {
    "model": "qwen2_5-vl-tiny", "seq_len": 512, "rows": 2, "micro_rows": 1, "steps": 6,
    "log_every": 2, "max_tiles": 16, "pack_buffer": 16, "precision": "fp32", "recompute": "none",
}  # fmt: skip


class StopRunError(Exception):
    """Raised by the timed loader's ``next()`` past ``--deadline``: ends the steps early."""


class TimedLoader:
    """The run's loader, with each ``next()`` timed: ``waits[i]`` the seconds step ``i + 1``
    waited for its batch, ``starts[i]`` when it asked. Everything else is the loader's own
    (``close``, ``state_dict``, ``bad_data`` ...). Prints the loader's figures of each window of
    ``log_every`` steps once its last step is done (the next ``next()`` call)."""

    def __init__(self, loader: Any, *, log_every: int, deadline: float | None) -> None:
        from forge_train.evaluation import input_tokens  # what tokens/s and MFU count

        self._input_tokens = input_tokens
        self._loader = loader
        self.log_every = log_every
        self.deadline = deadline
        self.waits: list[float] = []
        self.starts: list[float] = []
        self.tokens: list[int] = []
        self.images: list[int] = []
        self.patches: list[int] = []

    def __iter__(self) -> TimedLoader:
        return self

    def __next__(self) -> Any:
        now = time.perf_counter()
        done = len(self.starts)
        if done and done % self.log_every == 0:
            self.print_window(done - self.log_every, done, now)
        if self.deadline is not None and now > self.deadline:
            raise StopRunError(f"--deadline reached after {done} steps")
        batch = next(self._loader)
        self.starts.append(now)
        self.waits.append(time.perf_counter() - now)
        self.tokens.append(self._input_tokens(batch))
        images = patches = 0
        for mb in batch:
            grid = ((mb.get("visual") or {}).get("image") or {}).get("grid_thw")
            if grid is not None:
                images += int(grid.shape[0])
                patches += int(grid.prod(dim=-1).sum())
        self.images.append(images)
        self.patches.append(patches)
        return batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def window(
        self, first: int, last: int, end: float | None = None, tokens_per_s: float | None = None
    ) -> dict[str, float] | None:
        """Steps ``first + 1 .. last``: wall and wait seconds per step, images per step. The
        wall time is from one ``next()`` to the next (to ``end`` after the last step), or, given
        the metrics row's ``tokens_per_s``, the window's input tokens over it: forge-train's
        own clock, which also holds for the run's last window (no ``next()`` follows it)."""
        last = min(last, len(self.starts))
        if last <= first:
            return None
        n = last - first
        if tokens_per_s:
            wall = sum(self.tokens[first:last]) / tokens_per_s / n
        else:
            stop = self.starts[last] if last < len(self.starts) else end
            if stop is None:
                return None
            wall = (stop - self.starts[first]) / n
        return {
            "steps": n,
            "wall_s": wall,
            "wait_s": sum(self.waits[first:last]) / n,
            "wait_max_s": max(self.waits[first:last]),
            "images": sum(self.images[first:last]) / n,
            "patches": sum(self.patches[first:last]) / n,
        }

    def print_window(self, first: int, last: int, end: float) -> None:
        w = self.window(first, last, end)
        if w is not None:
            print(
                f"loader | steps {first + 1}-{last} | {w['wall_s']:.3f} s/step wall | waited "
                f"{w['wait_s']:.3f} s/step ({100 * w['wait_s'] / w['wall_s']:.1f}%), at most "
                f"{w['wait_max_s']:.3f} s | {w['images']:.1f} images, {w['patches']:.0f} patches "
                "per step",
                flush=True,
            )


def overrides(args: argparse.Namespace, output_dir: Path) -> list[str]:
    """forge-train's overrides for this run (``args.overrides`` last, so they win)."""
    return [
        "recipe=vlm",
        f"model={args.model}",
        "data=vlm-shards",
        f"data.paths=[{args.shards}]",
        f"data.seq_len={args.seq_len}",
        f"data.global_batch_rows={args.rows}",
        f"data.micro_batch_rows={args.micro_rows}",
        f"data.max_tiles={args.max_tiles}",
        f"data.pack_buffer={args.pack_buffer}",
        f"data.prefetch_buffers={args.prefetch_buffers}",
        # The demo tokenizer (no network on the GPU machine): the placeholder ids are its own.
        "model.config.image_token_id=null",
        "model.config.video_token_id=null",
        "model.config.vision_start_token_id=null",
        f"train.steps={args.steps}",
        f"train.precision={args.precision}",
        "train.eval_batches=0",
        f"parallel.recompute={args.recompute}",
        f"optim.lr={args.lr}",
        "optim.warmup_steps=5",
        "checkpoint.interval=0",
        "checkpoint.save_final=false",
        "checkpoint.resume=false",
        "checkpoint.export_hf=false",
        f"logging.log_every={args.log_every}",
        "logging.progress=plain",
        "logging.tensorboard=false",
        f"train.output_dir={output_dir}",
        *args.overrides,
    ]


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The training rows of ``metrics.jsonl`` (evaluation rows have no ``tokens_per_s``)."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "tokens_per_s" in r]


def summary(rows: list[dict[str, Any]], loader: TimedLoader, log_every: int) -> list[str]:
    """The table of metrics rows joined with the loader's windows, and the steady-state line
    (medians of the windows after the first, which holds the warm-up)."""
    lines = [
        f"{'step':>5} {'loss':>8} {'tokens/s':>10} {'MFU':>7} {'mem GB':>7} {'wall s':>8} "
        f"{'wait s':>8} {'wait %':>7} {'img/step':>8}"
    ]
    previous, steady = 0, []
    for r in rows:
        w = loader.window(previous, r["step"], tokens_per_s=r["tokens_per_s"])
        mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        cells = "  -" * 4
        if w is not None:
            cells = (
                f"{w['wall_s']:>8.3f} {w['wait_s']:>8.3f} {100 * w['wait_s'] / w['wall_s']:>6.1f}% "
                f"{w['images']:>8.1f}"
            )
        lines.append(
            f"{r['step']:>5} {r['loss']:>8.4f} {r['tokens_per_s']:>10,.0f} {mfu:>7} "
            f"{r['memory_gb']:>7.2f} {cells}"
        )
        if previous > 0:
            steady.append((r, w))
        previous = r["step"]
    if loader.waits:
        lines.append(
            f"first step: waited {loader.waits[0]:.3f} s for its batch (the first packing buffer "
            "decoded with nothing ahead)"
        )
    if not steady:
        lines.append("steady state: n/a (fewer than two metrics rows: raise --steps)")
        return lines
    tokens = statistics.median(r["tokens_per_s"] for r, _ in steady)
    mfus = [r["mfu"] for r, _ in steady if r.get("mfu") is not None]
    mfu = f"{100 * statistics.median(mfus):.1f}%" if mfus else "n/a (no known peak FLOP/s)"
    windows = [w for _, w in steady if w is not None]
    wait = (
        f"loader wait {statistics.median(w['wait_s'] for w in windows):.3f} s/step of "
        f"{statistics.median(w['wall_s'] for w in windows):.3f} s/step "
        f"({statistics.median(100 * w['wait_s'] / w['wall_s'] for w in windows):.1f}%), at most "
        f"{max(w['wait_max_s'] for w in windows):.3f} s"
        if windows
        else "loader wait n/a"
    )
    # Skipped samples (forge-train's count, summed over the run) would make the figures those
    # of less data than the shards hold: said beside them.
    bad = rows[-1].get("bad_samples", 0)
    lines.append(
        f"steady state (median of {len(steady)} windows of {log_every} steps after the first): "
        f"{tokens:,.0f} tokens/s | MFU {mfu} (vision encoder + projector counted) | {wait} | "
        f"peak memory {max(r['memory_gb'] for r in rows):.2f} GB | {bad} bad samples skipped"
    )
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path, required=True, help="make_vlm_shards.py's --out")
    parser.add_argument("--model", help=f"a model preset (default {GPU_DEFAULTS['model']})")
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--rows", type=int, help="packed rows per step (global batch)")
    parser.add_argument("--micro-rows", type=int, help="rows per micro-batch")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--log-every", type=int)
    parser.add_argument("--max-tiles", type=int, help="data.max_tiles: an image's pixel budget")
    parser.add_argument("--pack-buffer", type=int, help="data.pack_buffer: samples packed at once")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--recompute", help="parallel.recompute (none, full, selective, ...)")
    parser.add_argument("--prefetch-buffers", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--deadline", type=float, help="stop after this many seconds")
    parser.add_argument("--metrics-copy", type=Path, help="copy metrics.jsonl here")
    parser.add_argument("--smoke", action="store_true", help="the tiny model on a CPU")
    parser.add_argument("overrides", nargs="*", help="more forge-train overrides (key=value)")
    args = parser.parse_args(argv)
    for key, value in (SMOKE if args.smoke else GPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not args.shards.is_dir() or not any(args.shards.glob("*.tar")):
        parser.error(
            f"--shards {args.shards}: no .tar shards there; write them first with "
            "apps/train/benchmarks/make_vlm_shards.py --out DIR"
        )
    for flag in ("seq_len", "rows", "micro_rows", "steps", "log_every", "pack_buffer"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    output_dir = Path(tempfile.mkdtemp(prefix="forge-vlm-train-"))
    try:
        return run(args, output_dir, started)
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)


def run(args: argparse.Namespace, output_dir: Path, started: float) -> int:
    """Train in ``output_dir``, print the loader's windows and the summary; the exit status."""
    import torch

    import forge_train.loop as loop
    from forge_train.compose import compose_run_config
    from forge_train.config import ConfigError
    from forge_train.trainer import train

    try:
        cfg = compose_run_config(overrides(args, output_dir))
    except ConfigError as exc:
        print(f"bench_vlm_train: invalid config: {exc}", file=sys.stderr)
        return 2
    deadline = None if args.deadline is None else started + args.deadline
    timed: list[TimedLoader] = []
    build = loop.build_components

    def build_timed(*a: Any, **k: Any):
        parts = build(*a, **k)
        parts.loader = TimedLoader(parts.loader, log_every=args.log_every, deadline=deadline)
        timed.append(parts.loader)
        return parts

    print(
        f"bench_vlm_train: {args.model}, {args.rows} rows x {args.seq_len} tokens per step "
        f"(micro-batches of {args.micro_rows}), max_tiles {args.max_tiles}, {args.precision}, "
        f"recompute {args.recompute}, prefetch_buffers {args.prefetch_buffers}, {args.steps} "
        f"steps; shards {args.shards}; {os.cpu_count()} cores; torch {torch.__version__}; "
        f"run folder {output_dir}",
        flush=True,
    )
    status, stopped = 0, None
    loop.build_components = build_timed
    try:
        train(cfg)
    except StopRunError as exc:
        stopped = str(exc)
    except torch.OutOfMemoryError as exc:
        status = 3
        print(f"bench_vlm_train: CUDA out of memory: {str(exc).splitlines()[0]}", flush=True)
        print(
            f"allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB at the peak, "
            f"reserved {torch.cuda.max_memory_reserved() / 2**30:.2f} GiB; lower --seq-len or "
            "--micro-rows, or use --recompute full",
            flush=True,
        )
    except ConfigError as exc:
        print(f"bench_vlm_train: invalid config: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        stopped = "interrupted (SIGINT)"
    finally:
        loop.build_components = build
    loader = timed[0] if timed else None
    if stopped:
        print(f"bench_vlm_train: stopped early: {stopped}", flush=True)
    metrics = output_dir / "metrics.jsonl"
    rows = read_rows(metrics)
    if args.metrics_copy is not None and metrics.exists():
        shutil.copyfile(metrics, args.metrics_copy)
    if loader is not None:
        print("\n".join(summary(rows, loader, args.log_every)), flush=True)
    print(f"bench_vlm_train: {time.perf_counter() - started:.0f} s in all", flush=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
