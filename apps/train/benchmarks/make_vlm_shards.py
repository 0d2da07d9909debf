"""Write a synthetic webdataset shard set for ``data=vlm-shards``: photo-like images of realistic
sizes with short chat or caption samples, generated locally (no network, no dataset package), so
that a vision-language run can be timed where nothing can be downloaded (the lent GPU machine,
``tools/device/session.sh vlm``) or on a laptop.

::

    uv run python apps/train/benchmarks/make_vlm_shards.py --out /tmp/vlm-shards
    uv run python apps/train/benchmarks/make_vlm_shards.py --out /tmp/vlm-shards --smoke

Why synthetic but not random noise: a JPEG of white noise is several times larger than a photo
of the same size and decodes more slowly, so the loader's cost would be overstated. Each image is
a smooth colour field (a few random colours, bicubically upsampled) with a little grain, which
compresses and decodes like a photo (about 0.1-0.3 bytes a pixel at quality 90). Sides are drawn
uniformly from ``--min-px`` to ``--max-px`` (448-1344 by default: Qwen2.5-VL's processor keeps
the ones under its pixel budget at their own size and scales the larger ones down, as it does
for real photos); most images are JPEG, ``--png-fraction`` of them PNG (screenshots, charts).

A sample (the files sharing a webdataset key, :mod:`forge_train.vlm_stream`) is one of:

* a conversation ``key.json`` ``{"messages": [...]}`` with one ``<image>`` marker and its image
  ``key.jpg`` / ``key.png`` (the rest of the samples);
* a conversation with two images, ``key.0.*`` and ``key.1.*`` (``--two-image-fraction``);
* a caption ``key.txt`` beside one image (``--caption-fraction``);
* a text-only conversation (``--text-only-fraction``), as VLM SFT mixtures hold.

Shards are written in parallel (one process per shard, ``--workers``); the content depends only
on ``--seed`` and the shard's index, so the same flags give the same bytes on any machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

#: Words of the assistant answers and captions (the text's content is immaterial to throughput;
#: its length, a few dozen tokens a turn, is what matters).
_TEXT = (
    "a the of and with on in near under above left right red green blue yellow orange purple "
    "grey white dark light bright soft field sky water road tree building window door person "
    "car boat sign table chair wall floor shadow cloud hill river street light glass metal "
    "wood stone small large round square tall narrow wide old new quiet busy morning evening "
    "there is are shows appears looks seems two three several many one corner middle edge"
)
_WORDS = tuple(_TEXT.split())
_PROMPTS = (
    "Describe the image.",
    "What is in this picture?",
    "Which colours dominate here?",
    "Write a short caption for this photo.",
    "What stands out in the scene?",
    "Summarize what you see.",
)
_PAIR_PROMPTS = ("What differs between these two images?", "Compare the two pictures.")
_TEXT_PROMPTS = ("Explain what a histogram shows.", "Give three tips for taking photos at dusk.")


def _sentence(rng: np.random.Generator, lo: int, hi: int) -> str:
    words = rng.choice(_WORDS, size=int(rng.integers(lo, hi + 1)))
    return " ".join(words).capitalize() + "."


def _image(rng: np.random.Generator, *, lo: int, hi: int, png: bool) -> tuple[bytes, str]:
    """``(encoded bytes, extension)`` of one photo-like image with sides in ``[lo, hi]``."""
    from PIL import Image

    w, h = (int(x) for x in rng.integers(lo, hi + 1, 2))
    grid = rng.integers(0, 256, (int(rng.integers(2, 7)), int(rng.integers(2, 7)), 3))
    field = Image.fromarray(grid.astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    grain = rng.integers(-6, 7, (h, w, 3), dtype=np.int16)
    pixels = np.clip(np.asarray(field, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    if png:
        Image.fromarray(pixels).save(out, format="PNG", compress_level=1)
        return out.getvalue(), "png"
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue(), "jpg"


def _chat(user: str, assistant: str) -> bytes:
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return json.dumps({"messages": messages}).encode()


def write_shard(path: Path, *, index: int, args: argparse.Namespace) -> dict[str, int]:
    """One tar of ``args.per_shard`` samples; returns its counts (samples, images, bytes)."""
    rng = np.random.default_rng([args.seed, index])
    counts = {"samples": 0, "images": 0, "image_bytes": 0, "text_only": 0}

    def image(key: str) -> tuple[str, bytes]:
        data, ext = _image(
            rng, lo=args.min_px, hi=args.max_px, png=bool(rng.random() < args.png_fraction)
        )
        counts["images"] += 1
        counts["image_bytes"] += len(data)
        return f"{key}.{ext}", data

    with tarfile.open(path, "w") as tar:
        for i in range(args.per_shard):
            key = f"s{index:04d}_{i:05d}"
            roll = rng.random()
            files: list[tuple[str, bytes]]
            if roll < args.text_only_fraction:
                counts["text_only"] += 1
                prompt = str(rng.choice(_TEXT_PROMPTS))
                files = [(f"{key}.json", _chat(prompt, _sentence(rng, 30, 80)))]
            elif roll < args.text_only_fraction + args.caption_fraction:
                files = [image(key), (f"{key}.txt", _sentence(rng, 8, 30).encode())]
            elif roll < args.text_only_fraction + args.caption_fraction + args.two_image_fraction:
                name0, data0 = image(f"{key}.0")
                name1, data1 = image(f"{key}.1")
                user = f"<image>\n<image>\n{rng.choice(_PAIR_PROMPTS)}"
                files = [(name0, data0), (name1, data1),
                         (f"{key}.json", _chat(user, _sentence(rng, 20, 60)))]  # fmt: skip
            else:
                user = f"<image>\n{rng.choice(_PROMPTS)}"
                files = [image(key), (f"{key}.json", _chat(user, _sentence(rng, 15, 60)))]
            for name, data in files:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            counts["samples"] += 1
    return counts


def _check(args: argparse.Namespace) -> None:
    """``ValueError`` naming the flag for settings that cannot make a shard set."""
    if args.shards < 1 or args.per_shard < 1:
        raise ValueError(
            f"--shards {args.shards} --per-shard {args.per_shard}: both must be >= 1 (a "
            "data-parallel rank needs a shard of its own; give at least one per rank)"
        )
    if not 16 <= args.min_px <= args.max_px:
        raise ValueError(
            f"--min-px {args.min_px} --max-px {args.max_px}: need 16 <= min-px <= max-px "
            "(sides in pixels, e.g. 448 and 1344)"
        )
    fractions = {
        "--png-fraction": args.png_fraction,
        "--two-image-fraction": args.two_image_fraction,
        "--caption-fraction": args.caption_fraction,
        "--text-only-fraction": args.text_only_fraction,
    }
    for flag, value in fractions.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{flag} {value}: must be between 0 and 1")
    kinds = args.two_image_fraction + args.caption_fraction + args.text_only_fraction
    if kinds > 1.0:
        raise ValueError(
            f"--two-image-fraction + --caption-fraction + --text-only-fraction = {kinds:.2f} > 1: "
            "lower them (the rest of the samples are one-image conversations)"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for shard-NNNN.tar")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=64, help="samples per shard")
    parser.add_argument("--min-px", type=int, default=448, help="smallest image side")
    parser.add_argument("--max-px", type=int, default=1344, help="largest image side")
    parser.add_argument("--png-fraction", type=float, default=0.15)
    parser.add_argument("--two-image-fraction", type=float, default=0.1)
    parser.add_argument("--caption-fraction", type=float, default=0.15)
    parser.add_argument("--text-only-fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workers", type=int, default=None, help="processes (default: one per shard, <= cores)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny: 2 shards of 8 samples, 64-160 px images"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.shards, args.per_shard, args.min_px, args.max_px = 2, 8, 64, 160
    _check(args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    workers = args.workers or min(args.shards, os.cpu_count() or 1)
    paths = [args.out / f"shard-{i:04d}.tar" for i in range(args.shards)]
    start = time.perf_counter()
    if workers == 1:
        results = [write_shard(p, index=i, args=args) for i, p in enumerate(paths)]
    else:
        with ProcessPoolExecutor(workers) as pool:
            futures = [pool.submit(write_shard, p, index=i, args=args) for i, p in enumerate(paths)]
            results = [f.result() for f in futures]
    total = {k: sum(r[k] for r in results) for k in results[0]}
    size = sum(p.stat().st_size for p in paths)
    print(
        f"make_vlm_shards: {args.shards} shards x {args.per_shard} = {total['samples']} samples "
        f"({total['images']} images of {args.min_px}-{args.max_px} px, "
        f"{total['image_bytes'] / max(total['images'], 1) / 1e3:.0f} kB each on average; "
        f"{total['text_only']} text-only) in {args.out}: {size / 1e6:.1f} MB, "
        f"{time.perf_counter() - start:.1f} s with {workers} processes"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
