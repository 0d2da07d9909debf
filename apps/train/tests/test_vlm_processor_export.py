"""A VLM's Hugging Face export carries the image processor training used: transformers'
``AutoProcessor`` loads the folder and prepares an odd-sized image into the same grid, tiles and
number of image tokens as the run's forge processor (the defaults would use another pixel
budget / tile size / token count)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forge_train.compose import compose_run_config
from forge_train.data import load_run_tokenizer
from forge_train.modeling import build_model
from forge_train.vlm_model import export_vlm_hf, vlm_model_config
from forge_train.vlm_processing import build_processor

pytest.importorskip("skimage")
transformers = pytest.importorskip("transformers")

#: The text holding one image, as each family's chat template writes it.
IMAGE_TEXT = {
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "llava_onevision": "<image>",
}


@pytest.fixture(scope="module", autouse=True)
def data_cache(vlm_data_cache_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORGE_DATA_CACHE", str(vlm_data_cache_dir))
        yield


@pytest.mark.parametrize("preset", ["qwen2_5-vl-tiny", "llava-ov-tiny"])
def test_auto_processor_of_the_export_prepares_images_as_training(tmp_path, preset):
    from PIL import Image

    cfg = compose_run_config(
        ["recipe=vlm", f"train.output_dir={tmp_path / 'run'}", f"model={preset}"]
    )
    tokenizer = load_run_tokenizer(cfg.data, cfg.model)
    config = vlm_model_config(cfg.model, tokenizer, frozen=[])
    model, _ = build_model(cfg.model, config, seed=0)  # untrained: only the files matter here
    out = export_vlm_hf(
        model, config, tmp_path / "hf", tokenizer=tokenizer, lora=None, dtype=None,
        is_main=True, data=cfg.data,
    )  # fmt: skip
    assert (out / "preprocessor_config.json").is_file()
    processor = transformers.AutoProcessor.from_pretrained(out)

    image = np.random.default_rng(0).integers(0, 256, (37, 83, 3), dtype=np.uint8)
    ours = build_processor(config, cfg.data).sample_image(image, num_images=1)
    theirs = processor(
        text=[IMAGE_TEXT[config.family]], images=[Image.fromarray(image)], return_tensors="pt"
    )
    assert int((theirs["input_ids"] == config.image_token_id).sum()) == ours.num_tokens
    pixels = theirs["pixel_values"]
    if config.family == "qwen2_5_vl":
        assert torch.equal(theirs["image_grid_thw"], ours.fields["grid_thw"])
    else:
        assert torch.equal(theirs["image_sizes"], ours.fields["image_sizes"])
        pixels = pixels[0]  # [images, tiles, C, H, W] -> this image's tiles
    assert pixels.shape == ours.fields["pixel_values"].shape
    # within one 8-bit level after normalization (1 / 255 / std = 0.015): resize rounding
    torch.testing.assert_close(pixels, ours.fields["pixel_values"], rtol=0, atol=0.02)
