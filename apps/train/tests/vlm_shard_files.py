"""Members of webdataset shards for the VLM shard tests (``test_vlm_shards``,
``test_vlm_decode_workers``): seeded PNG images, chat json, captioned images, a tar's bytes."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np


def png(seed: int, size=(40, 30)) -> bytes:
    """A seeded random RGB image of ``size`` (rows, columns) as PNG bytes."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def chat(user: str, assistant: str) -> bytes:
    """A two-turn chat sample's ``.json`` member."""
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return json.dumps({"messages": messages}).encode()


def tar_bytes(files: list[tuple[str, bytes]]) -> bytes:
    """A tar archive of ``(member name, bytes)`` in order."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def captions(shard: int, n: int) -> list[tuple[str, bytes]]:
    """``n`` captioned images (``.png`` + ``.txt``) of shard ``shard``."""
    files = []
    for i in range(n):
        files += [(f"{shard}_{i}.png", png(10 * shard + i)),
                  (f"{shard}_{i}.txt", f"picture {i} of set {shard}".encode())]  # fmt: skip
    return files
