"""Wall time of a training loop on ``data=vlm-shards`` with the next packing buffers decoded in a
background thread (``data.prefetch_buffers=1``, :mod:`forge_train.vlm_stream`) against decoding
in the step when a buffer runs out (``data.prefetch_buffers=0``, the baseline), side by side.

Run on one process (no GPU needed)::

    uv run python apps/train/benchmarks/bench_vlm_prefetch.py --steps 24

Writes webdataset shards of JPEG photos-like images (smooth colour fields with noise, 256 to
512 pixels a side, random aspect ratio) with captions, then reads them with the
``model=qwen2_5-vl-tiny`` processor (dynamic resolution: images keep up to ``--max-tiles``
56 x 56 windows, about their own size at the default) and the demo tokenizer. The loop is
``next(loader)`` and a simulated training step: ``time.sleep`` (a GPU step, during which the
training process waits and holds no GIL) of ``--step-fraction`` times the data time per step
measured first without prefetching (1.0: the data takes as long as the step, where decoding in
the step doubles the step time). ``--busy`` also runs a step that holds the GIL instead (pure
Python), the worst case for a thread.

``--decode-workers N`` (``data.decode_workers``, :mod:`forge_train.vlm_decode_workers`) adds
variants decoding in ``N`` worker processes, without and with the prefetch thread, beside the
ones without workers in the same run, and times the two ways a worker's decoded sample can
come back (pickled through its pipe, or torch's shared memory: a file descriptor per tensor):
seconds per sample of one worker, and the training process's CPU seconds per sample. The
workers' pool starts in the warm-up step (a fork from the fork server, whose own start, once
per process, is also paid there by the first variant with workers).

Printed per variant (medians over ``--repeats`` alternating runs, each of ``--steps`` steps from
a fresh loader after one warm-up step): wall seconds per step, seconds per step waiting in
``next()``, and the speed-up over prefetch 0 without workers. Every variant yields the same
batches (checked: token ids and pixels).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def write_shards(root: Path, *, shards: int, per_shard: int, lo: int, hi: int) -> None:
    """``shards`` tar files of ``per_shard`` JPEG + caption samples."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for s in range(shards):
        with tarfile.open(root / f"shard-{s:03d}.tar", "w") as tar:
            for i in range(per_shard):
                h, w = (int(x) for x in rng.integers(lo, hi + 1, 2))
                y, x = np.mgrid[0:h, 0:w]
                base = rng.uniform(0, 255, 3) + 80 * np.sin(
                    np.stack([x / rng.uniform(20, 90), y / rng.uniform(20, 90), (x + y) / 70], -1)
                )
                pixels = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
                out = io.BytesIO()
                Image.fromarray(pixels).save(out, format="JPEG", quality=90)
                caption = f"a photo {i} of set {s}, {w} by {h} pixels, mostly colour fields"
                for name, data in [
                    (f"{s}_{i}.jpg", out.getvalue()),
                    (f"{s}_{i}.txt", caption.encode()),
                ]:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def build_data(root: Path, args):
    from forge_train.compose import compose_run_config
    from forge_train.data import load_run_tokenizer
    from forge_train.vlm_model import vlm_model_config
    from forge_train.vlm_stream import build_shard_data

    cfg = compose_run_config(
        [
            "recipe=vlm",
            "model=qwen2_5-vl-tiny",
            "data=vlm-shards",
            f"data.paths=[{root}]",
            f"data.seq_len={args.seq_len}",
            f"data.max_tiles={args.max_tiles}",
            f"data.pack_buffer={args.pack_buffer}",
            "train.output_dir=/nonexistent",
        ]
    )
    tokenizer = load_run_tokenizer(cfg.data, cfg.model)
    config = vlm_model_config(cfg.model, tokenizer, frozen=[])
    return build_shard_data(cfg.data, tokenizer, config, paths=cfg.data.paths, key="data.paths")


def run(
    data, args, *, prefetch: int, step_s: float, busy: bool, workers: int = 0
) -> tuple[float, float, list]:
    """``(wall s / step, s / step in next(), checksums of each step)`` of one loop."""
    from forge_train.vlm_stream import VLMStreamLoader

    loader = VLMStreamLoader(
        data, global_batch_rows=args.rows, micro_batch_rows=args.rows, seed=0, dp_rank=0,
        dp_size=1, pad_id=0, prefetch_buffers=prefetch, decode_workers=workers,
    )  # fmt: skip
    next(loader)  # warm-up: the first buffer is decoded in the step either way
    waited, marks = 0.0, []
    start = time.perf_counter()
    for _ in range(args.steps):
        t = time.perf_counter()
        batch = next(loader)
        waited += time.perf_counter() - t
        pixels = batch[0]["visual"].get("image", {}).get("pixel_values", torch.zeros(1))
        marks.append((int(batch[0]["input_ids"].sum()), float(pixels.double().sum())))
        if busy:  # holds the GIL, as a Python-heavy step would
            end = time.perf_counter() + step_s
            while time.perf_counter() < end:
                pass
        else:
            time.sleep(step_s)
    wall = time.perf_counter() - start
    loader.close()
    return wall / args.steps, waited / args.steps, marks


def transport_costs(data, root: Path, *, samples: int) -> dict[str, tuple[float, float]]:
    """``transport -> (wall s / sample, training-process CPU s / sample)`` of one decode
    worker decoding ``samples`` raw samples of the first shard, all submitted at once (the
    pool's start not counted): what bringing the decoded tensors back costs each way."""
    from forge_data.tar_shards import tar_samples
    from forge_train.vlm_decode_workers import DecodePool

    raws = list(tar_samples(str(sorted(root.glob("*.tar"))[0])))[:samples]
    out = {}
    for transport in ("pickle", "shared_memory"):
        pool = DecodePool(data.dataset, 1, transport=transport)
        pool.result(pool.submit(raws[0]))  # started
        wall, cpu = time.perf_counter(), time.process_time()
        tickets = [pool.submit(raw) for raw in raws]
        decoded = [pool.result(t) for t in tickets]
        out[transport] = (
            (time.perf_counter() - wall) / len(raws),
            (time.process_time() - cpu) / len(raws),
        )
        del decoded
        pool.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=8, help="packed rows per step")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-tiles", type=int, default=64)
    parser.add_argument("--pack-buffer", type=int, default=32)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=96)
    parser.add_argument("--min-px", type=int, default=256)
    parser.add_argument("--max-px", type=int, default=512)
    parser.add_argument("--step-fraction", type=float, default=1.0)
    parser.add_argument("--busy", action="store_true", help="also a GIL-holding step")
    parser.add_argument(
        "--decode-workers", type=int, default=0, help="also decode in this many processes"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_shards(
            root, shards=args.shards, per_shard=args.per_shard, lo=args.min_px, hi=args.max_px
        )
        data = build_data(root, args)
        # The data time per step without prefetching and without a step (median of 3): the
        # step's length.
        per_step = statistics.median(
            run(data, args, prefetch=0, step_s=0.0, busy=False)[0] for _ in range(3)
        )
        step_s = args.step_fraction * per_step
        print(
            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
            f"torch threads {torch.get_num_threads()}; {args.shards} x {args.per_shard} JPEGs "
            f"{args.min_px}-{args.max_px} px; {args.rows} rows of {args.seq_len} tokens per "
            f"step; pack_buffer {args.pack_buffer}; data time {per_step * 1e3:.0f} ms / step; "
            f"simulated step {step_s * 1e3:.0f} ms; {args.steps} steps x {args.repeats}"
        )
        # (prefetch_buffers, decode_workers)
        variants = [(0, 0), (1, 0)]
        if args.decode_workers:
            variants += [(0, args.decode_workers), (1, args.decode_workers)]
        print(
            f"{'step':<8}{'prefetch':>9}{'workers':>8}{'wall s/step':>13}{'in next() s':>13}"
            f"{'speed-up':>10}"
        )
        for busy in (False, True) if args.busy else (False,):
            walls: dict[tuple, list[float]] = {v: [] for v in variants}
            waits: dict[tuple, list[float]] = {v: [] for v in variants}
            marks = {}
            for _ in range(args.repeats):
                for v in variants:  # alternating: machine noise hits all alike
                    wall, wait, marks[v] = run(
                        data, args, prefetch=v[0], workers=v[1], step_s=step_s, busy=busy
                    )
                    walls[v].append(wall)
                    waits[v].append(wait)
            for v in variants:
                assert marks[v] == marks[0, 0], f"prefetch / workers {v} changed the batches"
            base = statistics.median(walls[0, 0])
            for v in variants:
                wall = statistics.median(walls[v])
                print(
                    f"{'busy' if busy else 'sleep':<8}{v[0]:>9}{v[1]:>8}{wall:>13.3f}"
                    f"{statistics.median(waits[v]):>13.3f}{base / wall:>9.2f}x"
                )
        if args.decode_workers:
            costs = transport_costs(data, root, samples=min(args.per_shard, 32))
            print(f"{'results':<15}{'wall ms/sample':>16}{'parent CPU ms/sample':>22}")
            for transport, (wall, cpu) in costs.items():
                print(f"{transport:<15}{wall * 1e3:>16.1f}{cpu * 1e3:>22.1f}")
        print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
