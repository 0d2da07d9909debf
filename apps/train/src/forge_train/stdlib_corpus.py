"""A real text corpus that is on every machine: the Python standard library's own source.

Until forge-data lands, the default job reads the ``.py`` files of the running interpreter's
standard library (a few tens of MB of real code), as raw UTF-8 bytes (a 256-symbol vocabulary,
no tokenizer download), in a fixed file order so every rank and every run sees the same corpus.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["ByteCorpus", "load_stdlib_corpus"]

VOCAB_SIZE = 256


@dataclass(frozen=True)
class ByteCorpus:
    """Token ids (bytes) split into a training and a held-out validation part."""

    train: torch.Tensor
    validation: torch.Tensor
    files: int

    def sample_batch(
        self, *, batch_size: int, seq_len: int, generator: torch.Generator, split: str = "train"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: ``inputs [B, T]`` and next-byte ``labels [B, T]``."""
        data = self.train if split == "train" else self.validation
        if data.numel() <= seq_len + 1:
            raise ValueError(f"the {split} split has {data.numel()} tokens, fewer than seq_len + 1")
        starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=generator)
        offsets = torch.arange(seq_len + 1)
        windows = data[starts[:, None] + offsets[None, :]].long()
        return windows[:, :-1], windows[:, 1:]


def load_stdlib_corpus(
    *, max_bytes: int = 32 * 2**20, validation_fraction: float = 0.02
) -> ByteCorpus:
    """Read up to ``max_bytes`` of the standard library's ``.py`` files (sorted by path)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    if not files:
        raise FileNotFoundError(
            f"no Python source files under {root}; this interpreter ships its standard library "
            "without sources, so the built-in corpus is unavailable"
        )
    chunks, total, used = [], 0, 0
    for path in files:
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        used += 1
        if total >= max_bytes:
            break
    tokens = torch.frombuffer(bytearray(b"\n".join(chunks)[:max_bytes]), dtype=torch.uint8)
    split = int(tokens.numel() * (1.0 - validation_fraction))
    return ByteCorpus(train=tokens[:split], validation=tokens[split:], files=used)
