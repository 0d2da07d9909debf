"""``InternVLProcessorConfig.to_hf`` writes the transformers files that read back as the same
settings (the inverse of ``from_hf``), and refuses what transformers cannot express."""

from __future__ import annotations

import pytest

from forge_data.vision import InternVLProcessorConfig
from forge_data.vision.intern_vl import HF_TOKENIZER_TOKENS


def test_to_hf_reads_back_as_the_same_settings():
    config = InternVLProcessorConfig(
        tile_size=(56, 84), min_patches=2, max_patches=6, patch_size=14, downsample_ratio=0.5,
        image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.3, 0.4), resample="bilinear",
        video_size=(28, 42), video_resample="nearest",
    )  # fmt: skip
    files = config.to_hf()
    model_config = {"downsample_ratio": 0.5, "vision_config": {"patch_size": [14, 14]}}
    back = InternVLProcessorConfig.from_hf(
        files["preprocessor_config.json"], model_config, files["video_preprocessor_config.json"]
    )
    assert back == config
    assert files["processor_config.json"]["image_seq_length"] == config.tokens_per_tile == 6
    assert files["preprocessor_config.json"]["size"] == {"height": 56, "width": 84}


def test_to_hf_refuses_a_tiled_image_without_thumbnail():
    with pytest.raises(ValueError, match="use_thumbnail=False"):
        InternVLProcessorConfig(max_patches=4, use_thumbnail=False).to_hf()
    # one tile: the thumbnail never applies, so the setting makes no difference
    assert InternVLProcessorConfig(max_patches=1, use_thumbnail=False).to_hf()


def test_tokenizer_tokens_are_the_placeholders():
    assert HF_TOKENIZER_TOKENS == {
        "start_image_token": "<img>", "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>",
    }  # fmt: skip
