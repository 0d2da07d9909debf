"""The VLM processors give the pixels of the transformers reference processors bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from forge_data.vision.intern_vl import InternVLProcessor, InternVLProcessorConfig
from forge_data.vision.llava_onevision import (
    LlavaOnevisionProcessor,
    LlavaOnevisionProcessorConfig,
)
from forge_data.vision.qwen2_vl import Qwen2VLProcessor, Qwen2VLProcessorConfig, smart_resize

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56], [28, 84], [84, 28]]


@pytest.fixture(scope="module")
def images():
    """Images of different sizes and modes: RGB, RGBA (composited on white), grayscale, palette
    with a transparent color, and a channels-last uint8 array."""
    rng = np.random.default_rng(0)
    rgb = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for h, w in [(50, 90), (33, 21), (64, 64), (120, 40)]
    ]
    rgba = Image.fromarray(rng.integers(0, 256, (30, 44, 4), dtype=np.uint8), "RGBA")
    gray = Image.fromarray(rng.integers(0, 256, (40, 30), dtype=np.uint8), "L")
    palette = Image.fromarray(rng.integers(0, 16, (26, 37), dtype=np.uint8), "P")
    palette.info["transparency"] = 3
    return [*rgb, rgba, gray, palette]


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("transformers")
    from transformers.models.got_ocr2 import image_processing_pil_got_ocr2 as got
    from transformers.models.llava_onevision import image_processing_pil_llava_onevision as lo
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as qw

    return {
        "qwen": qw.Qwen2VLImageProcessorPil,
        "llava": lo.LlavaOnevisionImageProcessorPil,
        "intern": got.GotOcr2ImageProcessorPil,
    }


def test_qwen2_vl_images_match_the_reference(images, hf):
    config = {
        "min_pixels": 28 * 28 * 4,
        "max_pixels": 28 * 28 * 20,
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
        "resample": 3,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }
    ref = hf["qwen"](**config)(images, return_tensors="pt")
    mine = Qwen2VLProcessor.from_hf(config)(images)
    assert torch.equal(mine["image"]["pixel_values"], ref["pixel_values"])
    assert torch.equal(mine["image"]["grid_thw"], ref["image_grid_thw"])
    grid = ref["image_grid_thw"]
    assert mine["num_tokens"].tolist() == (grid.prod(-1) // 4).tolist()
    # A channels-last uint8 array is the same image as its PIL form.
    arr = np.asarray(images[0])
    same = Qwen2VLProcessor.from_hf(config)([arr])["image"]["pixel_values"]
    assert torch.equal(same, ref["pixel_values"][: int(grid[0].prod())])


def test_qwen2_vl_smart_resize_rules():
    assert smart_resize(50, 90, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 1280) == (
        56,
        84,
    )
    h, w = smart_resize(4000, 3000, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    assert (h % 28, w % 28) == (0, 0)
    assert h * w <= 28 * 28 * 64
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2500, factor=28, min_pixels=1, max_pixels=10**9)


def test_qwen2_vl_video_groups_frames_in_reference_order():
    """Rows are (temporal group, block row, block col, row in block, col in block); columns
    (channel, frame in group, y, x); an odd frame count repeats the last frame."""
    cfg = Qwen2VLProcessorConfig(
        video_min_pixels=28 * 28, video_max_pixels=28 * 28 * 16, do_rescale=False
    )
    proc = Qwen2VLProcessor(cfg)
    frames = np.random.default_rng(1).integers(0, 256, (3, 56, 84, 3), dtype=np.uint8)
    item = proc.video(frames, fps=4.0)
    (t, h, w) = item.fields["grid_thw"][0].tolist()
    assert (t, h, w) == (2, 4, 6)
    assert item.num_tokens == 2 * 4 * 6 // 4
    assert item.extras == {"second_per_grid_ts": 0.5}
    std = torch.tensor(cfg.image_std).view(3, 1, 1)
    mean = torch.tensor(cfg.image_mean).view(3, 1, 1)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = torch.cat([x, x[-1:]])  # padded to 2 groups of 2
    x = (x - mean) / std
    got = item.fields["pixel_values"]
    p, m = 14, 2
    for r in range(got.shape[0]):
        g, rest = divmod(r, h * w)
        blk, inner = divmod(rest, m * m)
        by, bx = divmod(blk, w // m)
        iy, ix = divmod(inner, m)
        y0, x0 = (by * m + iy) * p, (bx * m + ix) * p
        expect = x[2 * g : 2 * g + 2, :, y0 : y0 + p, x0 : x0 + p].permute(1, 0, 2, 3)
        torch.testing.assert_close(got[r], expect.reshape(-1), rtol=0, atol=1e-5)


def test_qwen2_vl_image_and_identical_video_frames_agree(images):
    """An image is its frame repeated temporal_patch_size times: a two-frame video of it gives
    the same rows (up to the float rounding of the two normalization orders)."""
    cfg = Qwen2VLProcessorConfig(min_pixels=56 * 84, video_min_pixels=56 * 84)
    proc = Qwen2VLProcessor(cfg)
    frame = np.asarray(images[0].resize((84, 56)))
    image = proc.image(frame)
    video = proc.video(np.stack([frame, frame]))
    assert torch.equal(image.fields["grid_thw"], video.fields["grid_thw"])
    torch.testing.assert_close(
        image.fields["pixel_values"], video.fields["pixel_values"], rtol=0, atol=1e-5
    )


def test_llava_onevision_anyres_matches_the_reference(images, hf):
    config = {
        "size": {"height": 28, "width": 28},
        "image_grid_pinpoints": PINPOINTS,
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
    }
    ref = hf["llava"](**config)
    mine = LlavaOnevisionProcessor.from_hf(config, {"num_image_tokens": 4})
    for image in images:
        r = ref([image], return_tensors="pt")
        m = mine([image])
        assert torch.equal(m["image"]["pixel_values"], r["pixel_values"][0])
        assert m["image"]["tiles_per_item"].tolist() == [r["pixel_values"].shape[1]]
        assert m["image"]["image_sizes"].tolist() == r["image_sizes"].tolist()
    # Several images of one sample: one mean-padded square tile each.
    r = ref([images[:3]], return_tensors="pt")
    m = mine(images[:3])
    assert torch.equal(m["image"]["pixel_values"], r["pixel_values"][:, 0])
    assert m["image"]["tiles_per_item"].tolist() == [1, 1, 1]
    assert m["num_tokens"].tolist() == [5, 5, 5]


def test_llava_onevision_video_frames_and_tokens():
    proc = LlavaOnevisionProcessor(LlavaOnevisionProcessorConfig(size=(28, 28), num_image_tokens=9))
    item = proc.video(np.zeros((3, 40, 50, 3), dtype=np.uint8))
    assert item.fields["pixel_values"].shape == (3, 3, 28, 28)
    assert item.fields["tiles_per_item"].tolist() == [3]
    assert item.num_tokens == 3 * 2 * 2 + 1  # 3x3 features pooled to 2x2, plus a newline
    black = (0.0 - np.array(proc.config.image_mean)) / np.array(proc.config.image_std)
    torch.testing.assert_close(
        item.fields["pixel_values"][:, :, 0, 0],
        torch.tensor(black, dtype=torch.float32).expand(3, 3),
        rtol=0,
        atol=1e-5,
    )


def test_intern_vl_dynamic_tiles_match_the_reference(images, hf):
    config = {
        "size": {"height": 28, "width": 28},
        "max_patches": 6,
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
    }
    ref = hf["intern"](**config)(images, return_tensors="pt", crop_to_patches=True)
    model = {"downsample_ratio": 0.5, "vision_config": {"patch_size": [14, 14]}}
    proc = InternVLProcessor.from_hf(config, model)
    mine = proc(images)
    assert torch.equal(mine["image"]["pixel_values"], ref["pixel_values"])
    assert mine["image"]["tiles_per_item"].tolist() == ref["num_patches"].tolist()
    assert mine["num_tokens"].tolist() == ref["num_patches"].tolist()  # 1 token per 28 px tile
    assert [proc.num_tiles(*np.asarray(im).shape[:2]) for im in images] == ref[
        "num_patches"
    ].tolist()
    no_tiles = InternVLProcessor(InternVLProcessorConfig(tile_size=(28, 28), crop_to_patches=False))
    ref1 = hf["intern"](size={"height": 28, "width": 28})(images, return_tensors="pt")
    assert torch.equal(no_tiles(images)["image"]["pixel_values"], ref1["pixel_values"])


def test_intern_vl_videos_join_the_image_stream_in_placeholder_order(images):
    proc = InternVLProcessor(InternVLProcessorConfig(tile_size=(28, 28), max_patches=4))
    video = np.zeros((3, 30, 30, 3), dtype=np.uint8)
    out = proc(images[:1], [video], order=["video", "image"])
    assert "video" not in out
    tiles = proc.num_tiles(50, 90)
    assert out["image"]["tiles_per_item"].tolist() == [3, tiles]
    assert out["image"]["pixel_values"].shape == (3 + tiles, 3, 28, 28)
    assert out["num_tokens"].tolist() == [3, tiles]


def test_config_errors_say_what_to_fix():
    with pytest.raises(ValueError, match="max_pixels must be >= min_pixels"):
        Qwen2VLProcessorConfig(min_pixels=100, max_pixels=10)
    with pytest.raises(ValueError, match="unknown resampling filter"):
        Qwen2VLProcessorConfig(resample="cubic-ish")
    with pytest.raises(ValueError, match="must be a square"):
        LlavaOnevisionProcessorConfig(num_image_tokens=10)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        InternVLProcessorConfig(tile_size=(30, 30))
    with pytest.raises(ValueError, match=r"\(H, W, C\)"):
        Qwen2VLProcessor().image(np.zeros((3, 20, 20), dtype=np.float32))
    with pytest.raises(ValueError, match="order has 1 images"):
        Qwen2VLProcessor()([], [], order=["image"])
