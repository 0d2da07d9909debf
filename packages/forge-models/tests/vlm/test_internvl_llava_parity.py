"""InternVL and LLaVA-OneVision end to end against transformers: tiny models with random
weights, saved and loaded through ``forge_models.from_pretrained``; two documents packed in one
row on the forge side (images with different tile counts / aspect ratios), run one by one on the
reference side. Logits, every parameter gradient and the pixel gradients match in float32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from forge_core.testing import import_path
from forge_kernels.registry import reference_implementations
from forge_models.vlm import VisualInputs

ph = import_path(Path(__file__).parent.with_name("parity_helpers.py"), "forge_models_tests_ph_vlm2")

IMAGE, VIDEO, VOCAB = 90, 91, 100
TEXT = {
    "model_type": "qwen2", "hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB,
}  # fmt: skip
INTERNVL = {
    "vision_config": {
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "image_size": 32, "patch_size": 8,
    },
    "text_config": TEXT, "image_token_id": IMAGE, "downsample_ratio": 0.5,
}  # fmt: skip
PINPOINTS = [[21, 21], [21, 42], [42, 21], [42, 42]]
LLAVA = {
    "vision_config": {
        "model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 21, "patch_size": 7,
        "vision_use_head": False,
    },
    "text_config": TEXT, "image_grid_pinpoints": PINPOINTS,
    "image_token_id": IMAGE, "video_token_id": VIDEO,
}  # fmt: skip


@pytest.fixture(autouse=True)
def _eager_kernels():
    with reference_implementations():
        yield


def _text(n: int, seed: int) -> torch.Tensor:
    return torch.randint(1, 80, (n,), generator=torch.Generator().manual_seed(seed))


def _doc(parts, seed: int) -> torch.Tensor:
    return torch.cat([_text(p, seed + i) if isinstance(p, int) else torch.full((p[1],), p[0])
                      for i, p in enumerate(parts)])  # fmt: skip


def _compare(pair, docs, forge_visuals, ref_kwargs, *, k_bias_noise=False):
    """Packed forge forward vs the reference per document; logits and every gradient."""
    packed = torch.cat(docs)[None]
    cu = torch.tensor([0, *torch.cumsum(torch.tensor([len(d) for d in docs]), 0).tolist()])
    probe = ph.probe(VOCAB, (packed.shape[1],), seed=11)
    pair.zero_grad()
    logits = pair.model(packed, cu_seqlens=cu, images=forge_visuals)
    (logits[0] * probe).sum().backward()
    ref_logits = torch.cat(
        [
            pair.ref(input_ids=d[None], **kw).logits[0]
            for d, kw in zip(docs, ref_kwargs, strict=True)
        ]
    )
    (ref_logits * probe).sum().backward()
    assert ph.rel(logits[0], ref_logits) <= ph.RTOL
    return logits


def _pixels(shape, seed) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_internvl_packed_images_match_transformers(tmp_path):
    pair = ph.HFPair("InternVLConfig", "InternVLForConditionalGeneration", INTERNVL, tmp_path)
    assert pair.model.config.family == "internvl"
    tiles = [1, 3, 2]  # tiles per image; 4 tokens per 32-pixel tile (4x4 patches, shuffle 0.5)
    pixels = _pixels((sum(tiles), 3, 32, 32), seed=1).requires_grad_()
    ref_pixels = pixels.detach().clone().requires_grad_()
    visual = VisualInputs(pixel_values=pixels, tiles_per_item=torch.tensor(tiles))
    assert pair.model.num_visual_tokens(visual) == [4, 12, 8]
    docs = [_doc([3, (IMAGE, 4), 2, (IMAGE, 12), 3], seed=2), _doc([4, (IMAGE, 8), 5], seed=9)]
    ref_kwargs = [{"pixel_values": ref_pixels[:4]}, {"pixel_values": ref_pixels[4:]}]
    _compare(pair, docs, visual, ref_kwargs)
    assert ph.rel(pixels.grad, ref_pixels.grad) <= ph.RTOL
    pair.assert_grads_match(hf_layout="modules")


def test_llava_onevision_packed_anyres_images_match_transformers(tmp_path):
    pair = ph.HFPair(
        "LlavaOnevisionConfig", "LlavaOnevisionForConditionalGeneration", LLAVA, tmp_path
    )
    assert pair.model.config.family == "llava_onevision"
    sizes = torch.tensor([[18, 40], [40, 16]])  # (height, width): 1x2 and 2x1 crop grids, unpadded
    tiles = [3, 3]  # base tile + 1x2 / 2x1 crops (pinpoints 21x42, 42x21)
    pixels = _pixels((sum(tiles), 3, 21, 21), seed=3).requires_grad_()
    ref_pixels = pixels.detach().clone().requires_grad_()
    visual = VisualInputs(
        pixel_values=pixels, tiles_per_item=torch.tensor(tiles), image_sizes=sizes
    )
    counts = pair.model.num_visual_tokens(visual)
    docs = [_doc([3, (IMAGE, counts[0]), 4], seed=4), _doc([2, (IMAGE, counts[1]), 3], seed=5)]
    ref_kwargs = [
        {"pixel_values": ref_pixels[None, :3], "image_sizes": sizes[:1]},
        {"pixel_values": ref_pixels[None, 3:], "image_sizes": sizes[1:]},
    ]
    _compare(pair, docs, visual, ref_kwargs)
    assert ph.rel(pixels.grad, ref_pixels.grad) <= ph.RTOL
    # LLaVA reads the last layer before SigLIP's post-layernorm, which forge carries unapplied
    unused = ("model.vision_tower.post_layernorm.weight", "model.vision_tower.post_layernorm.bias")
    pair.assert_grads_match(hf_layout="modules", unused=unused)


def _image_inputs(family: str) -> tuple[torch.Tensor, VisualInputs, dict]:
    """One document with one image: ids, the forge visual inputs, transformers' kwargs."""
    if family == "internvl":
        pixels = _pixels((3, 3, 32, 32), seed=21)
        visual = VisualInputs(pixel_values=pixels, tiles_per_item=torch.tensor([3]))
        return _doc([3, (IMAGE, 12), 4], seed=22), visual, {"pixel_values": pixels}
    pixels, sizes = _pixels((3, 3, 21, 21), seed=23), torch.tensor([[18, 40]])
    visual = VisualInputs(pixel_values=pixels, tiles_per_item=torch.tensor([3]), image_sizes=sizes)
    return None, visual, {"pixel_values": pixels[None], "image_sizes": sizes}


@pytest.mark.parametrize(
    ("family", "config_cls", "model_cls", "config"),
    [
        ("internvl", "InternVLConfig", "InternVLForConditionalGeneration", INTERNVL),
        (
            "llava_onevision",
            "LlavaOnevisionConfig",
            "LlavaOnevisionForConditionalGeneration",
            LLAVA,
        ),
    ],
)
def test_save_pretrained_loads_in_transformers(tmp_path, family, config_cls, model_cls, config):
    """``save_pretrained`` of a forge VLM loads in transformers with every tensor (none missing,
    unexpected or mis-shaped) and gives forge's logits: a model loaded from a checkpoint and then
    changed (the source config.json passed through) and one built from scratch by forge (the
    config.json generated from the forge config)."""
    import forge_models

    pair = ph.HFPair(config_cls, model_cls, config, tmp_path / "source")
    loaded = forge_models.from_pretrained(pair.hf_dir, mmap=False)
    ph.perturb(loaded, seed=31)
    torch.manual_seed(32)
    fresh = forge_models.build_model(pair.model.config)  # forge's own init, no source config
    assert getattr(fresh, "hf_config", None) is None
    ids, visual, ref_kwargs = _image_inputs(family)
    if ids is None:  # LLaVA-OneVision: the placeholder count follows the AnyRes tiling
        ids = _doc([3, (IMAGE, pair.model.num_visual_tokens(visual)[0]), 4], seed=24)
    for name, model in (("loaded", loaded), ("fresh", fresh)):
        out = forge_models.save_pretrained(model, tmp_path / name)
        reloaded, info = pair.ref_cls.from_pretrained(out, output_loading_info=True)
        assert not any(info.values()), (name, info)
        with torch.no_grad():
            ours = model(ids[None], images=visual)
            theirs = reloaded.eval()(input_ids=ids[None], **ref_kwargs).logits
            source = pair.ref(input_ids=ids[None], **ref_kwargs).logits
        assert ph.rel(ours, theirs) <= ph.RTOL, name
        assert ph.rel(theirs, source) > 1e-2, name  # not the source model's weights
