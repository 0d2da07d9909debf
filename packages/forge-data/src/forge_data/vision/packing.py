"""Packing VLM samples into rows, with attention blocks for their images and videos.

Samples are placed into rows of ``seq_len`` tokens by forge's packer
(:func:`forge_data.packing.pack_documents`, first fit over a window of open rows); a sample is
never split, since its placeholders must stay with their pixels. :func:`collate_vlm` builds the
text tensors as :func:`forge_data.packing.collate_rows` does (labels within a document,
``position_ids`` restarting per document, ``cu_seqlens`` over the flattened batch) and adds

* ``block_ids`` ``[B, seq_len]``: the visual item's index in the batch (placeholder order, row
  by row) on its feature tokens, -1 on text and padding. Attention is causal within a document
  and bidirectional within a block (the mask :func:`vlm_attention_mask` builds);
* ``visual``: the items' tensors joined per stream in the same order (``visual["image"]`` /
  ``visual["video"]`` are ``VisualInputs`` fields, ``grid_thw`` / ``tiles_per_item`` /
  ``image_sizes`` concatenated), their ``num_tokens`` and ``encoder_seqlens``;
* ``padding_waste``: the padded fraction of the batch's token slots.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from forge_data.packing import PackingStats, block_diagonal_mask, collate_rows, pack_documents
from forge_data.vision.processing import concat_visuals

__all__ = ["collate_vlm", "pack_vlm_samples", "vlm_attention_mask"]


def pack_vlm_samples(
    samples: Sequence[Mapping[str, Any]],
    *,
    seq_len: int,
    window: int = 64,
    order: Sequence[int] | None = None,
) -> tuple[list[list[int]], PackingStats]:
    """Rows (lists of indices into ``samples``) of at most ``seq_len`` tokens; samples longer
    than ``seq_len`` are skipped and counted in the stats."""
    lengths = np.array([len(s["input_ids"]) for s in samples], dtype=np.int64)
    plan = pack_documents(
        np.arange(len(samples)) if order is None else order,
        lengths,
        seq_len=seq_len,
        window=window,
        overlong="skip",
    )
    rows = [plan.doc[plan.row_pieces(r)].tolist() for r in range(plan.num_rows)]
    return rows, plan.stats


def collate_vlm(
    rows: Sequence[Sequence[Mapping[str, Any]]], *, seq_len: int, pad_id: int
) -> dict[str, Any]:
    """The batch of packed rows of VLM samples (see the module doc)."""
    pieces = [
        [
            (
                np.asarray(s["input_ids"]),
                None if s.get("loss_mask") is None else np.asarray(s["loss_mask"]),
            )
            for s in row
        ]
        for row in rows
    ]
    batch: dict[str, Any] = collate_rows(pieces, seq_len=seq_len, pad_id=pad_id)
    block_ids = torch.full((len(rows), seq_len), -1, dtype=torch.long)
    visuals = []
    items = 0
    for b, row in enumerate(rows):
        t = 0
        for s in row:
            n = len(s["input_ids"])
            blocks = torch.as_tensor(s["block_ids"], dtype=torch.long)
            count = len(s["visual"]["num_tokens"]) if "visual" in s else 0
            top = int(blocks.max()) if blocks.numel() else -1
            if blocks.numel() != n or top >= count:
                raise ValueError(
                    f"sample {s.get('key', '?')} has {blocks.numel()} block ids for {n} tokens "
                    f"and ids up to {top} for {count} visual items"
                )
            block_ids[b, t : t + n] = torch.where(blocks >= 0, blocks + items, -1)
            items += count
            if count:
                visuals.append(s["visual"])
            t += n
    tokens = sum(len(s["input_ids"]) for row in rows for s in row)
    batch["block_ids"] = block_ids
    batch["visual"] = concat_visuals(visuals)
    batch["padding_waste"] = torch.tensor(1.0 - tokens / max(len(rows) * seq_len, 1))
    return batch


def vlm_attention_mask(cu_seqlens: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """The ``(T, T)`` boolean mask (True: may attend) of a flattened packed batch: causal within
    each ``cu_seqlens`` segment, and bidirectional among the tokens of one visual block
    (``block_ids`` flattened to ``[T]``, -1 for none). For SDPA with an explicit mask and tests."""
    block = block_ids.reshape(-1)
    if block.numel() != int(cu_seqlens[-1]):
        raise ValueError(
            f"block_ids has {block.numel()} tokens but cu_seqlens covers {int(cu_seqlens[-1])}"
        )
    same_block = (block[:, None] == block[None, :]) & (block[:, None] >= 0)
    same_doc = block_diagonal_mask(cu_seqlens, causal=False)
    return block_diagonal_mask(cu_seqlens, causal=True) | (same_block & same_doc)
