"""SigLIP and SigLIP 2 vision towers vs transformers' ``SiglipVisionModel`` /
``Siglip2VisionModel``: outputs, every gradient (parameters and pixels) at float32 within
1e-5, through forge-ckpt's ``siglip_vision`` / ``siglip2_vision`` mappings; the mappings'
round trips and the configs. Tiny random models, nothing downloaded."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from forge_ckpt.mapping.families.siglip2_vision import MAPPING as SIGLIP2_MAPPING
from forge_ckpt.mapping.families.siglip_vision import MAPPING as SIGLIP_MAPPING
from forge_core.testing import import_path
from forge_kernels.registry import reference_implementations
from forge_models.vision.siglip import (
    SiglipVisionConfig,
    SiglipVisionEncoder,
    siglip_config_from_hf,
    siglip_config_to_hf,
)
from forge_models.vision.siglip2 import (
    Siglip2VisionConfig,
    Siglip2VisionEncoder,
    siglip2_config_from_hf,
    siglip2_config_to_hf,
)
from forge_models.vlm import VisualInputs

ph = import_path(
    Path(__file__).parents[1] / "parity_helpers.py", "forge_models_tests_parity_helpers"
)
RTOL, rel = ph.RTOL, ph.rel

_TOWER = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "vision_use_head": True,  # forge builds no pooling head: its tensors must be dropped
}
#: 30 px with patch 7: 4 x 4 patches, the last 2 pixel rows / columns dropped (valid conv).
SIGLIP = {**_TOWER, "image_size": 30, "patch_size": 7}
#: A 4 x 4 position grid, resized per image.
SIGLIP2 = {**_TOWER, "patch_size": 4, "num_patches": 16}
#: SigLIP 2 images: (h, w) in patches, different sizes and aspect ratios.
GRIDS = [(3, 5), (4, 4), (6, 2)]


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Norm weights away from 1 and biases away from 0, so every parameter matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def siglip_ref():
    import transformers

    torch.manual_seed(0)
    model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SIGLIP)).eval()
    _randomize(model)
    return model


@pytest.fixture(scope="module")
def siglip2_ref():
    import transformers

    torch.manual_seed(1)
    model = transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(**SIGLIP2)).eval()
    _randomize(model, seed=1)
    return model


def _load(encoder_cls, config, ref, spec, feature_layer):
    """The forge encoder with the reference's weights, through the mapping; and its context."""
    hf_config = ref.config.to_dict()
    encoder = encoder_cls(config(hf_config, feature_layer=feature_layer))
    state = ref.state_dict()
    options = {"feature_layer": feature_layer}
    if spec is SIGLIP_MAPPING:
        options["with_projector"] = False
    ctx = spec.context(hf_config, **options, **spec.detect_context(state))
    encoder.load_state_dict(dict(spec.hf_to_forge(state.items(), ctx)), strict=True)
    return encoder, ctx


def _assert_grads(encoder, ref, spec, ctx, pixels, ref_pixels, pixel_rows=None):
    """Every forge gradient equals the reference's (same name through the mapping); the
    reference parameters forge carries unapplied (buffers: the post-layernorm, the blocks
    after ``feature_layer``) got no gradient there and hold the reference's values."""
    buffers = dict(encoder.named_buffers())
    grads = {n: p.grad for n, p in encoder.named_parameters()}
    ours = dict(spec.forge_to_hf((grads | buffers).items(), ctx))
    carried = {n: ours.pop(n) for b in spec.bind(ctx) if b.forge in buffers for n in b.hf}
    params = dict(ref.named_parameters())
    for name, value in carried.items():
        assert params[name].grad is None, name
        assert torch.equal(value, params[name]), name
    theirs = {n: p.grad for n, p in params.items() if p.grad is not None}
    assert sorted(ours) == sorted(theirs)
    for name, grad in theirs.items():
        if name.endswith("k_proj.bias"):
            # Zero up to rounding: softmax ignores the per-query constant q . b_k it adds.
            scale = theirs[name.replace("k_proj.bias", "q_proj.bias")].norm()
            assert max(ours[name].norm(), grad.norm()) <= 1e-4 * scale, name
            continue
        assert rel(ours[name], grad) <= RTOL, (name, rel(ours[name], grad))
    ref_grad = ref_pixels.grad if pixel_rows is None else ref_pixels.grad[pixel_rows]
    assert rel(pixels.grad, ref_grad) <= RTOL


@pytest.mark.parametrize("feature_layer", [None, -1, 1])
def test_siglip_matches_transformers(siglip_ref, feature_layer):
    encoder, ctx = _load(
        SiglipVisionEncoder, siglip_config_from_hf, siglip_ref, SIGLIP_MAPPING, feature_layer
    )
    assert len(encoder.blocks) == (1 if feature_layer == 1 else 2)
    assert len(encoder.unapplied_blocks) == (1 if feature_layer == 1 else 0)
    assert encoder.applies_post_layernorm == (feature_layer is None)
    # Not applied: carried as buffers (loaded and saved, never trained), as transformers' VLMs.
    assert {n for n, _ in encoder.named_parameters() if "post_layernorm" in n} == (
        {"post_layernorm.weight", "post_layernorm.bias"} if feature_layer is None else set()
    )
    assert torch.equal(encoder.post_layernorm.bias, siglip_ref.post_layernorm.bias)
    pixels = torch.randn(3, 3, 30, 30, generator=torch.Generator().manual_seed(3))
    ref_pixels = pixels.clone().requires_grad_()
    pixels.requires_grad_()
    siglip_ref.zero_grad(set_to_none=True)
    out_ref = siglip_ref(ref_pixels, output_hidden_states=True)
    want = (
        out_ref.last_hidden_state if feature_layer is None else out_ref.hidden_states[feature_layer]
    )
    with reference_implementations():
        got = encoder(VisualInputs(pixel_values=pixels))
        assert got.shape == (3 * 16, 32)
        probe = torch.randn(got.shape, generator=torch.Generator().manual_seed(4))
        (got * probe).sum().backward()
    (want.flatten(0, 1) * probe).sum().backward()
    assert rel(got, want.flatten(0, 1)) <= RTOL
    _assert_grads(encoder, siglip_ref, SIGLIP_MAPPING, ctx, pixels, ref_pixels)


def _naflex_batch(grids, patch_dim, seed=5):
    """Packed patches for forge, and the reference's padded batch with its mask."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [h * w for h, w in grids]
    packed = torch.randn(sum(sizes), patch_dim, generator=gen)
    longest = max(sizes)
    padded = torch.zeros(len(grids), longest, patch_dim)
    mask = torch.zeros(len(grids), longest, dtype=torch.long)
    rows = torch.zeros(len(grids), longest, dtype=torch.bool)
    for k, chunk in enumerate(packed.split(sizes)):
        padded[k, : len(chunk)] = chunk
        mask[k, : len(chunk)] = 1
        rows[k, : len(chunk)] = True
    return packed, padded, mask, rows


@pytest.mark.parametrize("feature_layer", [None, -1])
def test_siglip2_naflex_matches_transformers(siglip2_ref, feature_layer):
    encoder, ctx = _load(
        Siglip2VisionEncoder, siglip2_config_from_hf, siglip2_ref, SIGLIP2_MAPPING, feature_layer
    )
    packed, padded, mask, rows = _naflex_batch(GRIDS, 4 * 4 * 3)
    packed.requires_grad_()
    padded.requires_grad_()
    shapes = torch.tensor(GRIDS)
    siglip2_ref.zero_grad(set_to_none=True)
    out_ref = siglip2_ref(padded, mask, shapes, output_hidden_states=True)
    want = out_ref.last_hidden_state if feature_layer is None else out_ref.hidden_states[-1]
    want = want[rows]  # the real patches, packed
    grid_thw = torch.tensor([[1, h, w] for h, w in GRIDS])
    with reference_implementations():
        got = encoder(VisualInputs(pixel_values=packed, grid_thw=grid_thw))
        probe = torch.randn(got.shape, generator=torch.Generator().manual_seed(6))
        (got * probe).sum().backward()
    (want * probe).sum().backward()
    assert rel(got, want) <= RTOL
    _assert_grads(encoder, siglip2_ref, SIGLIP2_MAPPING, ctx, packed, padded, rows)


@pytest.mark.parametrize("hub_layout", [True, False])
def test_mappings_round_trip_bit_exact(siglip_ref, siglip2_ref, hub_layout):
    for ref, spec, encoder_cls, config in (
        (siglip_ref, SIGLIP_MAPPING, SiglipVisionEncoder, siglip_config_from_hf),
        (siglip2_ref, SIGLIP2_MAPPING, Siglip2VisionEncoder, siglip2_config_from_hf),
    ):
        prefix = "vision_model." if hub_layout else ""  # the Hub's vs transformers 5's names
        state = {prefix + n: t for n, t in ref.state_dict().items()}
        hf_config = ref.config.to_dict()
        options = {"with_projector": False} if spec is SIGLIP_MAPPING else {}
        assert spec.detect_context(state) == {"vision_model_prefix": hub_layout}
        for feature_layer in (None, -1, 1):
            ctx = spec.context(
                hf_config, feature_layer=feature_layer, **options, **spec.detect_context(state)
            )
            spec.check_hf({n: t.shape for n, t in state.items()}, ctx)
            forge = dict(spec.hf_to_forge(state.items(), ctx))
            encoder = encoder_cls(config(hf_config, feature_layer=feature_layer))
            assert sorted(forge) == sorted(encoder.state_dict())
            back = dict(spec.forge_to_hf(forge.items(), ctx))
            # every tensor but the pooling head; the block after feature_layer=1 carried
            dropped = {n for n in state if n.removeprefix(prefix).startswith("head.")}
            assert sorted(back) == sorted(set(state) - dropped)
            assert all(torch.equal(back[n], state[n]) for n in back)
            if feature_layer == 1:  # a target with no place for it drops it on import
                assert "unapplied_blocks.0.attn.q_proj.weight" in forge
                drop = spec.context(
                    hf_config,
                    feature_layer=1,
                    carry_unapplied_layers=False,
                    **options,
                    **spec.detect_context(state),
                )
                assert drop["ignored_hf_layers"] == {1}
                kept = dict(spec.hf_to_forge(state.items(), drop))
                assert sorted(kept) == sorted(n for n in forge if "unapplied_blocks" not in n)


def test_configs_round_trip_and_validate():
    cfg = SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=96,
        num_layers=3,
        num_heads=4,
        image_size=28,
        patch_size=14,
    )
    assert siglip_config_from_hf(siglip_config_to_hf(cfg)) == cfg
    assert cfg.num_patches == 4
    assert cfg.depth == 3
    cfg2 = Siglip2VisionConfig(
        hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4, patch_size=16,
        num_patches=64, feature_layer=None,
    )  # fmt: skip
    assert siglip2_config_from_hf(siglip2_config_to_hf(cfg2), feature_layer=None) == cfg2
    assert siglip_config_from_hf({**SIGLIP, "num_hidden_layers": 4}, feature_layer=-2).depth == 3
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        replace(cfg, num_heads=5)
    with pytest.raises(ValueError, match="feature_layer=4 is out of range"):
        replace(cfg, feature_layer=4)
    with pytest.raises(ValueError, match="square number"):
        replace(cfg2, num_patches=60)
    with pytest.raises(ValueError, match="attention_dropout"):
        siglip_config_from_hf({**SIGLIP, "attention_dropout": 0.1})
    with pytest.raises(ValueError, match="activation 'swish'"):
        replace(cfg, hidden_act="swish")


def test_encoders_reject_bad_inputs():
    siglip = SiglipVisionEncoder(siglip_config_from_hf(SIGLIP))
    with pytest.raises(ValueError, match=r"pixel_values \[tiles, 3, 30, 30\]"):
        siglip(VisualInputs(pixel_values=torch.zeros(2, 3, 28, 28)))
    siglip2 = Siglip2VisionEncoder(siglip2_config_from_hf(SIGLIP2))
    patches = torch.zeros(12, 48)
    with pytest.raises(ValueError, match=r"needs VisualInputs\.grid_thw"):
        siglip2(VisualInputs(pixel_values=patches))
    with pytest.raises(ValueError, match="t = 1"):
        siglip2(VisualInputs(pixel_values=patches, grid_thw=torch.tensor([[2, 2, 3]])))
    with pytest.raises(ValueError, match="gives 9 patches but pixel_values has 12"):
        siglip2(VisualInputs(pixel_values=patches, grid_thw=torch.tensor([[1, 3, 3]])))


def test_init_weights_after_to_empty_is_seeded():
    config = siglip_config_from_hf(SIGLIP, feature_layer=None)
    with torch.device("meta"):
        encoder = SiglipVisionEncoder(config)
    encoder.to_empty(device="cpu")
    states = []
    for _ in range(2):
        encoder.init_weights(generator=torch.Generator().manual_seed(7))
        states.append({n: t.clone() for n, t in encoder.state_dict().items()})
    assert all(torch.equal(states[0][n], states[1][n]) for n in states[0])
    assert all(torch.isfinite(t).all() for t in states[0].values())
    assert torch.equal(encoder.post_layernorm.weight, torch.ones(32))
    assert encoder.blocks[0].attn.q_proj.weight.std() > 0
