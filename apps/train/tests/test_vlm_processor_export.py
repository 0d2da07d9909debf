"""A VLM's Hugging Face export carries the image processor training used: transformers'
``AutoProcessor`` loads the folder and prepares an odd-sized image into the same grid, tiles and
number of image tokens as the run's forge processor (the defaults would use another pixel
budget / tile size / token count); InternVL's a video's frames too. The processor files are
written inside the weights' atomic folder write: a failure writing them leaves the previous
export as it was, and no temporary folder."""

from __future__ import annotations

import pathlib

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
    "internvl": "<IMG_CONTEXT>",
}

#: Presets as overrides: the tiny InternVL is the tiny InternVL-style model with InternViT.
PRESETS = {
    "qwen2_5-vl-tiny": ["model=qwen2_5-vl-tiny"],
    "llava-ov-tiny": ["model=llava-ov-tiny"],
    "internvl-tiny": [
        "model=vlm-tiny", "model.config.vision.name=intern_vit", "+model.config.family=internvl",
    ],
}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def data_cache(vlm_data_cache_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORGE_DATA_CACHE", str(vlm_data_cache_dir))
        yield


def _export(tmp_path, preset, *, seed=0):
    cfg = compose_run_config(
        ["recipe=vlm", f"train.output_dir={tmp_path / 'run'}", *PRESETS[preset]]
    )
    tokenizer = load_run_tokenizer(cfg.data, cfg.model)
    config = vlm_model_config(cfg.model, tokenizer, frozen=[])
    model, _ = build_model(cfg.model, config, seed=seed)  # untrained: only the files matter here
    out = export_vlm_hf(
        model, config, tmp_path / "hf", tokenizer=tokenizer, lora=None, dtype=None,
        is_main=True, data=cfg.data,
    )  # fmt: skip
    return cfg, config, out


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_auto_processor_of_the_export_prepares_images_as_training(tmp_path, preset):
    from PIL import Image

    cfg, config, out = _export(tmp_path, preset)
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
    elif config.family == "llava_onevision":
        assert torch.equal(theirs["image_sizes"], ours.fields["image_sizes"])
        pixels = pixels[0]  # [images, tiles, C, H, W] -> this image's tiles
    else:  # InternVL: [tiles, C, H, W], 2x1 tiles and the thumbnail
        assert int(ours.fields["tiles_per_item"]) == 3
    assert pixels.shape == ours.fields["pixel_values"].shape
    # within one 8-bit level after normalization (1 / 255 / std = 0.015): resize rounding
    torch.testing.assert_close(pixels, ours.fields["pixel_values"], rtol=0, atol=0.02)
    if config.family == "internvl":  # its video processor reads video_preprocessor_config.json
        frames = np.random.default_rng(1).integers(0, 256, (3, 41, 29, 3), dtype=np.uint8)
        ours = build_processor(config, cfg.data).video(frames)
        theirs = processor(text=["<video>"], videos=[frames], return_tensors="pt")
        assert int((theirs["input_ids"] == config.image_token_id).sum()) == ours.num_tokens
        torch.testing.assert_close(
            theirs["pixel_values"], ours.fields["pixel_values"], rtol=0, atol=0.02
        )


def test_processor_files_are_written_inside_the_atomic_write(tmp_path, monkeypatch):
    """The processor and tokenizer files are in the temporary folder when it is renamed into
    place, and a failure writing them leaves the previous export whole (not new weights
    without them)."""
    import forge_ckpt.hf.io as hf_io

    published: list[list[str]] = []
    publish = hf_io.publish_folder

    def recording_publish(tmp, final):
        published.append(sorted(p.name for p in tmp.iterdir()))
        publish(tmp, final)

    monkeypatch.setattr(hf_io, "publish_folder", recording_publish)
    _, _, out = _export(tmp_path, "llava-ov-tiny")
    written = {"preprocessor_config.json", "processor_config.json", "tokenizer.json"}
    assert written | {"tokenizer_config.json"} <= set(published[0])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"preprocessor_config.json", "config.json", "tokenizer.json"} <= set(before)

    def failing(write):
        def wrapped(self, data, *args, **kwargs):
            if self.name == "preprocessor_config.json":
                raise OSError("disk full")
            return write(self, data, *args, **kwargs)

        return wrapped

    for method in ("write_bytes", "write_text"):
        monkeypatch.setattr(pathlib.Path, method, failing(getattr(pathlib.Path, method)))
    with pytest.raises(OSError, match="disk full"):
        _export(tmp_path, "llava-ov-tiny", seed=1)  # other weights
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
