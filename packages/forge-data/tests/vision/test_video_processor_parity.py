"""The video paths of the VLM processors give the pixels of transformers' torchvision-based video
processors (``Qwen2VLVideoProcessor``, ``LlavaOnevisionVideoProcessor``,
``InternVLVideoProcessor``) bit for bit, frames already sampled (``do_sample_frames=False``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forge_data.vision.intern_vl import InternVLProcessor
from forge_data.vision.llava_onevision import LlavaOnevisionProcessor
from forge_data.vision.qwen2_vl import Qwen2VLProcessor

pytest.importorskip("torchvision", reason="transformers' video processors need torchvision")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def videos():
    """Clips with odd and even frame counts, wide, tall and square frames, and one frame."""
    rng = np.random.default_rng(0)
    shapes = [(4, 50, 90), (3, 33, 61), (6, 64, 64), (1, 120, 40), (5, 28, 300)]
    return [rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8) for t, h, w in shapes]


@pytest.mark.parametrize(
    "settings",
    [
        {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 20},
        {"min_pixels": 28 * 28, "max_pixels": 28 * 28 * 6, "resample": 2},
        {
            "min_pixels": 28 * 28 * 4,
            "max_pixels": 28 * 28 * 40,
            "cap_pixels_per_frame": True,
            "max_video_tokens": 24,
        },
    ],
    ids=["bicubic", "bilinear-small", "per-frame-cap"],
)
def test_qwen2_vl_videos_match_the_reference(videos, settings):
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    settings = {"cap_pixels_per_frame": False, **settings}
    reference = Qwen2VLVideoProcessor(**settings)
    mine = Qwen2VLProcessor.from_hf({}, video_config=settings)
    for clip in videos:
        ref = reference(videos=[clip], return_tensors="pt", do_sample_frames=False)
        item = mine.video(clip)
        assert torch.equal(item.fields["grid_thw"], ref["video_grid_thw"]), clip.shape
        assert torch.equal(item.fields["pixel_values"], ref["pixel_values_videos"]), clip.shape


def test_qwen2_vl_video_batch_matches_the_reference_concatenation(videos):
    """A batch of clips is the concatenation of each clip's patches, in order."""
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    settings = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 12}
    ref = Qwen2VLVideoProcessor(cap_pixels_per_frame=False, **settings)(
        videos=videos, return_tensors="pt", do_sample_frames=False
    )
    mine = Qwen2VLProcessor.from_hf({}, video_config=settings)
    items = [mine.video(clip) for clip in videos]
    assert torch.equal(
        torch.cat([i.fields["pixel_values"] for i in items]), ref["pixel_values_videos"]
    )
    assert torch.equal(torch.cat([i.fields["grid_thw"] for i in items]), ref["video_grid_thw"])


@pytest.mark.parametrize("size", [384, 56])
def test_llava_onevision_videos_match_the_reference(videos, size):
    from transformers.models.llava_onevision.video_processing_llava_onevision import (
        LlavaOnevisionVideoProcessor,
    )

    config = {"size": {"height": size, "width": size}}
    reference = LlavaOnevisionVideoProcessor(**config)
    mine = LlavaOnevisionProcessor.from_hf(config)
    for clip in videos:
        ref = reference(videos=[clip], return_tensors="pt", do_sample_frames=False)
        item = mine.video(clip)
        assert torch.equal(item.fields["pixel_values"], ref["pixel_values_videos"][0]), clip.shape
        assert item.fields["tiles_per_item"].tolist() == [clip.shape[0]]


@pytest.mark.parametrize("size", [448, 56])
def test_intern_vl_videos_match_the_reference(videos, size):
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    config = {"size": {"height": size, "width": size}}
    reference = InternVLVideoProcessor(**config)
    mine = InternVLProcessor.from_hf(config, video_config=config)
    for clip in videos:
        ref = reference(videos=[clip], return_tensors="pt", do_sample_frames=False)
        item = mine.video(clip)
        assert torch.equal(item.fields["pixel_values"], ref["pixel_values_videos"][0]), clip.shape
