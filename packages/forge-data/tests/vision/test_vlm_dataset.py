"""VLM samples from webdataset shards: chats and captions with images and a video; bad data is
counted with its location and skipped."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from forge_data.multimodal import MultimodalConfig
from forge_data.vision.placeholders import QWEN2_VL, with_vision_tokens
from forge_data.vision.qwen2_vl import Qwen2VLProcessor, Qwen2VLProcessorConfig
from forge_data.vision.vlm_dataset import VLMDataset


def _png(size, color=(200, 10, 10), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def _npy(arr):
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _chat(content, reply="A cat."):
    return json.dumps(
        {
            "messages": [
                {"role": "user", "content": content},
                {"role": "assistant", "content": reply},
            ]
        }
    ).encode()


@pytest.fixture(scope="module")
def shard(tmp_path_factory, write_tar):
    parts = [{"type": "image"}, {"type": "text", "text": "Compare."}, {"type": "image"}]
    samples = [
        # Two images named so that plain string order would swap them (10 < 2).
        ("chat", {"json": _chat(parts), "2.png": _png((56, 28)), "10.png": _png((28, 84))}),
        ("caption", {"txt": b"A red square.", "png": _png((40, 40), (255, 0, 0, 128), "RGBA")}),
        (
            "video",
            {
                "json": json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": "<video>What happens?"},
                            {"role": "assistant", "content": "Nothing."},
                        ],
                        "fps": 2.0,
                    }
                ).encode(),
                "frames.npy": _npy(np.zeros((3, 28, 56, 3), np.uint8)),
            },
        ),
        ("broken", {"txt": b"x", "png": b"\x89PNG\r\n\x1a\nnot an image"}),
        ("missing", {"json": _chat([{"type": "image"}, {"type": "image"}]), "png": _png((28, 28))}),
        ("thin", {"txt": b"too thin", "png": _png((2, 600))}),
        ("long", {"txt": b"word " * 300, "png": _png((28, 28))}),
        (
            "late",
            {
                "json": json.dumps({"text": "word " * 300 + "<image>"}).encode(),
                "png": _png((28, 28)),
            },
        ),
    ]
    path = tmp_path_factory.mktemp("vlm") / "shard-0.tar"
    write_tar(path, samples)
    return str(path)


@pytest.fixture(scope="module")
def processor():
    return Qwen2VLProcessor(
        Qwen2VLProcessorConfig(
            min_pixels=28 * 28,
            max_pixels=28 * 28 * 4,
            video_min_pixels=28 * 28,
            video_max_pixels=28 * 28 * 4,
        )
    )


def test_samples_expand_placeholders_and_count_bad_data(shard, tokenizer, processor):
    tok = with_vision_tokens(tokenizer, QWEN2_VL)
    config = MultimodalConfig(
        urls=[shard], seq_len=128, chat_template="chatml", shuffle_shards=False, overlong="skip"
    )
    ds = VLMDataset(config, tok, processor)
    samples = {s["key"]: s for s in ds}
    assert sorted(samples) == ["caption", "chat", "video"]

    chat = samples["chat"]
    # 2.png (28 x 56 pixels: 2 x 4 patches, 2 tokens) comes before 10.png (84 x 28: 6 x 2, 3).
    assert chat["visual"]["image"]["grid_thw"].tolist() == [[1, 2, 4], [1, 6, 2]]
    assert chat["visual"]["num_tokens"].tolist() == [2, 3]
    blocks = chat["block_ids"]
    assert (blocks == 0).sum() == 2
    assert (blocks == 1).sum() == 3
    assert chat["loss_mask"][blocks >= 0].sum() == 0
    trained = chat["input_ids"][chat["loss_mask"] == 1].tolist()
    assert tok.decode(trained) == "A cat.<|im_end|>\n"
    text = tok.decode(chat["input_ids"].tolist())
    assert "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>Compare." in text

    caption = samples["caption"]
    assert tok.decode(caption["input_ids"][caption["loss_mask"] == 1].tolist()) == ("A red square.")
    # RGBA is composited onto white, as the reference converts it: (255, 127, 127).
    mean, std = torch.tensor(processor.config.image_mean), torch.tensor(processor.config.image_std)
    first = caption["visual"]["image"]["pixel_values"][0].reshape(3, -1)[:, 0]
    expect = (torch.tensor([255.0, 127.0, 127.0]) / 255 - mean) / std
    torch.testing.assert_close(first, expect, rtol=0, atol=1e-2)

    video = samples["video"]
    assert video["visual"]["video"]["grid_thw"].tolist() == [[2, 2, 4]]
    assert video["visual"]["second_per_grid_ts"].tolist() == [1.0]  # 2 frames per group at 2 fps
    assert (video["block_ids"] == 0).sum() == 4
    assert "image" not in video["visual"]

    assert ds.report.counts == {
        "undecodable media": 1,
        "placeholder mismatch": 1,
        "unusable media": 1,
        "over-long sample": 2,
    }
    where = {r["reason"]: r["location"] for r in ds.report.records}
    assert where["placeholder mismatch"].endswith("shard-0.tar:missing")


def test_text_after_the_last_image_may_be_truncated(shard, tokenizer, processor):
    tok = with_vision_tokens(tokenizer, QWEN2_VL)
    config = MultimodalConfig(
        urls=[shard], seq_len=64, shuffle_shards=False, chat_template="chatml"
    )
    ds = VLMDataset(config, tok, processor)
    samples = {s["key"]: s for s in ds}
    assert samples["long"]["input_ids"].numel() == 64
    assert (samples["long"]["block_ids"] == 0).sum() == 1  # the image is whole
    assert "late" not in samples  # cutting would drop its image's placeholder
    assert ds.report.counts["over-long sample"] == 1
    assert ds.report.counts["truncated sample"] == 1


def test_dataset_refuses_inconsistent_setup(shard, tokenizer, processor):
    with pytest.raises(ValueError, match="no single token"):
        VLMDataset(MultimodalConfig(urls=[shard], seq_len=64), tokenizer, processor)
    tok = with_vision_tokens(tokenizer, QWEN2_VL)
    with pytest.raises(ValueError, match="image_size must be None"):
        VLMDataset(MultimodalConfig(urls=[shard], seq_len=64, image_size=(8, 8)), tok, processor)
