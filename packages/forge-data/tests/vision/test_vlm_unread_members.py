"""A sample member whose extension no reader takes (``key.webp2``) is named when the sample
fails for it, instead of the placeholder mismatch it causes."""

from __future__ import annotations

import io
import json

from PIL import Image

from forge_data.multimodal import MultimodalConfig, unread_members
from forge_data.vision.placeholders import QWEN2_VL, with_vision_tokens
from forge_data.vision.qwen2_vl import Qwen2VLProcessor, Qwen2VLProcessorConfig
from forge_data.vision.vlm_dataset import VLMDataset


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (28, 28), (10, 200, 10)).save(buf, format="PNG")
    return buf.getvalue()


def test_unread_members_names_only_unknown_extensions():
    raw = {"__key__": "s1", "__url__": "a.tar", "json": b"", "0.png": b"", "frames.npy": b""}
    assert unread_members(raw) == ""
    message = unread_members({**raw, "1.webp2": b""})
    assert message.startswith("member(s) s1.1.webp2 not read")
    assert "images: jpg, jpeg, png, webp, bmp" in message


def test_an_image_with_an_unknown_extension_is_reported_as_such(tmp_path, write_tar, tokenizer):
    chat = json.dumps(
        {
            "messages": [
                {"role": "user", "content": "<image> What is this?"},
                {"role": "assistant", "content": "Green."},
            ]
        }
    ).encode()
    path = tmp_path / "shard.tar"
    write_tar(
        path, [("good", {"json": chat, "png": _png()}), ("odd", {"json": chat, "webp2": _png()})]
    )
    processor = Qwen2VLProcessor(Qwen2VLProcessorConfig(min_pixels=28 * 28, max_pixels=28 * 28 * 4))
    config = MultimodalConfig(
        urls=[str(path)], seq_len=128, chat_template="chatml", shuffle_shards=False
    )
    ds = VLMDataset(config, with_vision_tokens(tokenizer, QWEN2_VL), processor)
    assert [s["key"] for s in ds] == ["good"]
    assert ds.report.counts == {"unknown member type": 1}
    (record,) = ds.report.records
    assert record["location"].endswith("shard.tar:odd")
    assert "odd.webp2 not read" in record["detail"]
    assert "0 images were given" in record["detail"]  # the consequence, kept for context
