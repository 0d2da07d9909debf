"""Packed VLM rows: attention never crosses documents, image blocks are bidirectional, visual
tensors follow the placeholders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forge_data.packing import IGNORE_INDEX
from forge_data.vision.packing import collate_vlm, pack_vlm_samples, vlm_attention_mask
from forge_data.vision.placeholders import QWEN2_VL, encode_vlm_chat, with_vision_tokens
from forge_data.vision.processing import concat_items
from forge_data.vision.qwen2_vl import Qwen2VLProcessor, Qwen2VLProcessorConfig


@pytest.fixture(scope="module")
def samples(tokenizer):
    """Six conversations with 0-2 images of different sizes and one with a video."""
    tok = with_vision_tokens(tokenizer, QWEN2_VL)
    proc = Qwen2VLProcessor(
        Qwen2VLProcessorConfig(
            min_pixels=28 * 28,
            max_pixels=28 * 28 * 6,
            video_min_pixels=28 * 28,
            video_max_pixels=28 * 28 * 2,
        )
    )
    rng = np.random.default_rng(0)
    out = []
    for i, shapes in enumerate([[(28, 56)], [], [(84, 28), (28, 28)], [(56, 56)], [], [(28, 84)]]):
        images = [proc.image(rng.integers(0, 256, (*s, 3), dtype=np.uint8)) for s in shapes]
        videos = [proc.video(np.zeros((2, 28, 56, 3), np.uint8))] if i == 4 else []
        parts = [{"type": "image"}] * len(images) + [{"type": "video"}] * len(videos)
        messages = [
            {"role": "user", "content": [*parts, {"type": "text", "text": "Say" + " more" * i}]},
            {"role": "assistant", "content": "Words" + " and words" * (5 - i)},
        ]
        s = encode_vlm_chat(
            tok, messages, QWEN2_VL, images=images, videos=videos, template="chatml"
        )
        out.append(
            {
                "input_ids": torch.tensor(s.input_ids),
                "loss_mask": torch.tensor(s.loss_mask, dtype=torch.uint8),
                "block_ids": torch.tensor(s.block_ids),
                "visual": concat_items(s.items),
            }
        )
    return tok, out


def test_collate_packs_rows_with_block_ids_and_visuals_in_order(samples):
    tok, data = samples
    seq_len = 96
    rows, stats = pack_vlm_samples(data, seq_len=seq_len, window=4)
    assert sorted(i for r in rows for i in r) == list(range(len(data)))
    assert any(len(r) > 1 for r in rows)
    batch = collate_vlm([[data[i] for i in r] for r in rows], seq_len=seq_len, pad_id=0)
    B = len(rows)
    assert batch["input_ids"].shape == batch["block_ids"].shape == (B, seq_len)
    assert batch["padding_waste"].item() == pytest.approx(stats.padding_waste)

    # Block ids: batch-unique, in token order, each as long as its item's placeholder.
    flat = batch["block_ids"].reshape(-1)
    seen = flat[flat >= 0].unique_consecutive()
    assert seen.tolist() == list(range(len(seen)))
    assert torch.bincount(flat[flat >= 0]).tolist() == batch["visual"]["num_tokens"].tolist()
    # Visual tensors follow the same order, row by row.
    order = [data[i] for r in rows for i in r]
    grids = [s["visual"]["image"]["grid_thw"] for s in order if "image" in s["visual"]]
    assert torch.equal(batch["visual"]["image"]["grid_thw"], torch.cat(grids))
    pixels = [s["visual"]["image"]["pixel_values"] for s in order if "image" in s["visual"]]
    assert torch.equal(batch["visual"]["image"]["pixel_values"], torch.cat(pixels))
    assert batch["visual"]["video"]["grid_thw"].tolist() == [[1, 2, 4]]
    features = torch.tensor([tok.token_to_id("<|image_pad|>"), tok.token_to_id("<|video_pad|>")])
    is_feature = torch.isin(batch["input_ids"], features)
    assert torch.equal(is_feature, batch["block_ids"] >= 0)
    # No label is a placeholder, positions restart per document.
    assert not torch.isin(batch["labels"], features).any()
    docs, pos = batch["document_ids"], batch["position_ids"]
    for b in range(B):
        for d in docs[b][docs[b] >= 0].unique():
            assert pos[b][docs[b] == d].tolist() == list(range(int((docs[b] == d).sum())))
    assert (batch["labels"] != IGNORE_INDEX).any()


def test_attention_mask_is_causal_per_document_and_bidirectional_per_block(samples):
    _, data = samples
    seq_len = 96
    rows, _ = pack_vlm_samples(data, seq_len=seq_len, window=4)
    batch = collate_vlm([[data[i] for i in r] for r in rows], seq_len=seq_len, pad_id=0)
    mask = vlm_attention_mask(batch["cu_seqlens"], batch["block_ids"])
    T = batch["block_ids"].numel()
    # Independent expectation from each token's (row, document) and block.
    row = torch.arange(T) // seq_len
    doc = batch["document_ids"].reshape(-1)
    block = batch["block_ids"].reshape(-1)
    pos = torch.arange(T)
    same_doc = (row[:, None] == row[None, :]) & (doc[:, None] == doc[None, :])
    same_block = (block[:, None] == block[None, :]) & (block[:, None] >= 0)
    expected = same_doc & ((pos[None, :] <= pos[:, None]) | same_block)
    assert torch.equal(mask, expected)
    assert not (mask & ~same_doc).any()  # never across documents or rows
    for b in block[block >= 0].unique():
        idx = (block == b).nonzero().squeeze(1)
        assert mask[idx][:, idx].all()  # bidirectional inside an image
        text_after = idx[-1] + 1
        if text_after < T and doc[text_after] == doc[idx[-1]]:
            assert not mask[idx[0], text_after]  # still causal towards the following text


def test_collate_rejects_inconsistent_block_ids(samples):
    _, data = samples
    bad = dict(data[0], block_ids=data[0]["block_ids"][:-1])
    with pytest.raises(ValueError, match="block ids"):
        collate_vlm([[bad]], seq_len=64, pad_id=0)
