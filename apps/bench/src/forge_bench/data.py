"""The benchmark batch: rows of packed documents, as forge and as transformers take them.

Every row of ``seq`` tokens holds several documents of random lengths (seeded, so every
implementation gets the same batch); a document never crosses a row boundary. Forge takes the
rows flattened to one packed row ``[1, rows * seq]`` with FlashAttention's ``cu_seqlens``;
transformers takes ``[rows, seq]`` with ``position_ids`` restarting at 0 in each document,
from which its mask code builds the block-diagonal causal mask (``find_packed_sequence_indices``
in ``transformers.masking_utils``). The labels ignore the first token of every document but
the first of a row, which is what forge drops by itself: no document predicts the next one's
first token, so both compute the same loss.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from forge_models import IGNORE_INDEX

__all__ = ["PackedBatch", "document_lengths", "packed_batch"]


@dataclass(frozen=True, kw_only=True)
class PackedBatch:
    """``input_ids [rows, seq]`` and the document lengths of each row (each row sums to seq)."""

    input_ids: torch.Tensor
    lengths: tuple[tuple[int, ...], ...]

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()

    def forge_inputs(self, device: torch.device) -> dict[str, object]:
        """Keyword arguments of forge's ``CausalLM``: one packed row and ``cu_seqlens``."""
        flat = [n for row in self.lengths for n in row]
        cu = torch.tensor([0, *flat], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        ids = self.input_ids.reshape(1, -1).to(device)
        return {
            "input_ids": ids,
            "labels": ids,
            "cu_seqlens": cu.to(device),
            "max_seqlen": max(flat),
        }

    def hf_inputs(self, device: torch.device, *, packed: bool) -> dict[str, torch.Tensor]:
        """Keyword arguments of a transformers causal LM; ``packed=False`` leaves the rows as
        plain sequences (no position restarts, attention across documents)."""
        ids = self.input_ids.to(device)
        if not packed:
            return {"input_ids": ids, "labels": ids}
        positions = torch.cat([torch.arange(n) for row in self.lengths for n in row])
        positions = positions.view_as(self.input_ids)
        labels = self.input_ids.masked_fill(
            (positions == 0) & _not_row_start(positions), IGNORE_INDEX
        )
        return {
            "input_ids": ids,
            "position_ids": positions.to(device),
            "labels": labels.to(device),
        }


def _not_row_start(positions: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(positions, dtype=torch.bool)
    mask[:, 0] = False
    return mask


def document_lengths(seq: int, rng: random.Random, *, min_len: int) -> tuple[int, ...]:
    """Random document lengths in ``[min_len, seq]`` filling one row of ``seq`` tokens."""
    lengths, left = [], seq
    while left > 0:
        n = min(rng.randint(min_len, seq), left)
        lengths.append(n)
        left -= n
    return tuple(lengths)


def packed_batch(*, rows: int, seq: int, vocab_size: int, seed: int = 0) -> PackedBatch:
    """``rows`` rows of ``seq`` random tokens, each packed with documents of ``seq / 8`` to
    ``seq`` tokens (the last one of a row cut to fit)."""
    if rows < 1 or seq < 2:
        raise ValueError(f"need rows >= 1 and seq >= 2, got rows={rows}, seq={seq}")
    rng = random.Random(seed)
    lengths = tuple(document_lengths(seq, rng, min_len=max(1, seq // 8)) for _ in range(rows))
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (rows, seq), generator=gen)
    return PackedBatch(input_ids=ids, lengths=lengths)
