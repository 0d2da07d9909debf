"""InternViT encoder + InternVL pixel-shuffle projector vs transformers (InternVLVisionModel,
InternVLForConditionalGeneration.get_image_features): weights copied through the forge-ckpt
mapping, float32 outputs and every gradient (parameters and pixel_values) within 1e-5."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from forge_ckpt.mapping.families.intern_vit_vision import MAPPING
from forge_core.testing import import_path
from forge_kernels.registry import reference_implementations
from forge_models.vision.intern_vit import (
    InternVisionConfig,
    InternVisionEncoder,
    intern_vit_config_from_hf,
    intern_vit_config_to_hf,
)
from forge_models.vision.pixel_shuffle_projector import (
    PixelShuffleProjector,
    PixelShuffleProjectorConfig,
    pixel_shuffle_projector_config_from_hf,
    pixel_shuffle_projector_config_to_hf,
)
from forge_models.vision.vit_blocks import UnappliedLayerNorm
from forge_models.vlm.inputs import VisualInputs

ph = import_path(
    Path(__file__).parents[1] / "parity_helpers.py", "forge_models_tests_parity_helpers"
)

TINY = {
    "hidden_size": 32,
    "num_layers": 2,
    "num_heads": 2,
    "intermediate_size": 64,
    "image_size": 32,
    "patch_size": 8,
}
TEXT = {
    "model_type": "qwen2",
    "hidden_size": 48,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 64,
    "vocab_size": 64,
}


def _hf_vision_config(config: InternVisionConfig) -> dict:
    return {k: v for k, v in intern_vit_config_to_hf(config).items() if k != "model_type"}


@torch.no_grad()
def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Informative random weights: norms near one, nonzero biases, CLS / positions / layer scales
    (transformers starts them at zero or a constant)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if "norm" in name or "lambda" in name:
            p.copy_(1 + 0.2 * noise)
        elif name.endswith("bias"):
            p.copy_(0.1 * noise)
        elif "cls_token" in name or "position_embeddings" in name:
            p.copy_(0.5 * noise)


def _load(spec_ctx: dict, hf_state: dict, *modules: tuple[str, torch.nn.Module]) -> None:
    """Copy ``hf_state`` through the mapping into the forge modules (``(prefix, module)``)."""
    forge = dict(MAPPING.hf_to_forge(hf_state.items(), spec_ctx))
    for prefix, module in modules:
        own = {n.removeprefix(prefix): t for n, t in forge.items() if n.startswith(prefix)}
        module.load_state_dict(own, strict=True)
        forge = {n: t for n, t in forge.items() if not n.startswith(prefix)}
    assert not forge, sorted(forge)


def _forge_grads_as_hf(
    ctx: dict, *modules: tuple[str, torch.nn.Module], ref: torch.nn.Module | None = None
) -> dict:
    """The forge gradients under their checkpoint names. The tensors forge carries unapplied
    (buffers: the blocks after ``feature_layer``, an unused final layernorm) are mapped along
    and left out; with ``ref`` (a bare tower), they must hold its values and it got no
    gradient there."""
    grads = {prefix + n: p.grad for prefix, m in modules for n, p in m.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    buffers = {prefix + n: t for prefix, m in modules for n, t in m.named_buffers()}
    ours = dict(MAPPING.forge_to_hf((grads | buffers).items(), ctx))
    carried = {n: ours.pop(n) for b in MAPPING.bind(ctx) if b.forge in buffers for n in b.hf}
    if ref is not None:
        params = dict(ref.named_parameters())
        for name, value in carried.items():
            assert params[name].grad is None, name
            assert torch.equal(value, params[name]), name
    return ours


def _ref_grads(ref: torch.nn.Module, prefix: str = "", strip: str = "") -> dict:
    """The reference's gradients of the parameters under ``prefix``, ``strip`` removed."""
    return {
        n.removeprefix(strip): p.grad
        for n, p in ref.named_parameters()
        if p.grad is not None and n.startswith(prefix)
    }


def _assert_grads(ours: dict, want: dict) -> None:
    assert sorted(ours) == sorted(want)  # every parameter, no more, no less
    for name, g in want.items():
        if g.norm() < 1e-6:
            # Zero up to rounding on both sides: the key bias (softmax ignores a shift of all
            # scores of a query) when no q/k norm follows the projection.
            assert ours[name].norm() < 1e-6, name
            continue
        assert ph.rel(ours[name], g) <= ph.RTOL, (name, ph.rel(ours[name], g))


def _pixels(tiles: int, height: int, width: int, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tiles, 3, height, width, generator=g)


CASES = {
    # norm, qk norm, attention bias, post norm (use_mean_pooling=False), tile (h, w),
    # feature_layer, drop_cls_token
    "ln-stored-grid-full": ("layer_norm", False, True, False, (32, 32), -1, False),
    "rms-qknorm-interpolated": ("rms_norm", True, False, True, (48, 48), -1, True),
    "ln-qknorm-nonsquare-layer-2": ("layer_norm", True, True, True, (32, 40), -2, False),
    "rms-layer1": ("rms_norm", False, True, False, (32, 32), 1, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_encoder_matches_internvl_vision_model(case):
    import transformers

    norm, qk, bias, post, (h, w), feature_layer, drop_cls = CASES[case]
    config = InternVisionConfig(
        **TINY,
        norm_type=norm,
        use_qk_norm=qk,
        attention_bias=bias,
        post_norm=post,
        feature_layer=feature_layer,
        drop_cls_token=drop_cls,
    )
    ref = transformers.InternVLVisionModel(
        transformers.InternVLVisionConfig(**_hf_vision_config(config))
    ).eval()
    _randomize(ref)
    encoder = InternVisionEncoder(config)
    assert len(encoder.blocks) == config.num_built_layers
    assert len(encoder.unapplied_blocks) == config.num_layers - config.num_built_layers
    ctx = MAPPING.context(ref.config.to_dict(), feature_layer=feature_layer, projector=False)
    _load(ctx, ref.state_dict(), ("", encoder))

    pixels = _pixels(3, h, w)
    px_ref, px_ours = pixels.clone().requires_grad_(), pixels.clone().requires_grad_()
    out_ref = ref(pixel_values=px_ref, output_hidden_states=True)
    if feature_layer == -1:
        want = out_ref.last_hidden_state
    else:
        want = out_ref.hidden_states[feature_layer]
    if drop_cls:
        want = want[:, 1:]
    want = want.reshape(-1, config.hidden_size)
    with reference_implementations():
        got = encoder(VisualInputs(pixel_values=px_ours, tiles_per_item=torch.tensor([1, 2])))
        assert got.shape == (3 * encoder.num_tokens_per_tile(pixels), config.hidden_size)
        assert ph.rel(got, want) <= ph.RTOL
        probe = torch.randn(want.shape, generator=torch.Generator().manual_seed(5))
        (got * probe).sum().backward()
    (want * probe).sum().backward()
    assert ph.rel(px_ours.grad, px_ref.grad) <= ph.RTOL
    _assert_grads(_forge_grads_as_hf(ctx, ("", encoder), ref=ref), _ref_grads(ref))


def test_image_features_match_internvl_for_conditional_generation():
    """Vision tower + pixel shuffle + projector, three images of 1, 2 and 3 tiles."""
    import transformers

    vision = InternVisionConfig(**TINY, attention_bias=True)
    hf_config = transformers.InternVLConfig(
        vision_config=_hf_vision_config(vision), text_config=TEXT, downsample_ratio=0.5
    )
    ref = transformers.InternVLForConditionalGeneration(hf_config).eval()
    _randomize(ref)
    hf_dict = hf_config.to_dict()
    encoder = InternVisionEncoder(intern_vit_config_from_hf(hf_dict["vision_config"]))
    projector = PixelShuffleProjector(pixel_shuffle_projector_config_from_hf(hf_dict))
    ctx = MAPPING.context(hf_dict["vision_config"])
    tower = {
        n.removeprefix("model.vision_tower."): t
        for n, t in ref.state_dict().items()
        if n.startswith("model.vision_tower.")
    }
    head = {
        n.removeprefix("model."): t
        for n, t in ref.state_dict().items()
        if n.startswith("model.multi_modal_projector.")
    }
    _load(ctx, {**tower, **head}, ("projector.", projector), ("", encoder))

    pixels = _pixels(6, 32, 32)
    visual_tiles = torch.tensor([1, 2, 3])
    px_ref, px_ours = pixels.clone().requires_grad_(), pixels.clone().requires_grad_()
    want = ref.model.get_image_features(
        pixel_values=px_ref, vision_feature_layer=-1, vision_feature_select_strategy="default"
    ).pooler_output
    want = want.reshape(-1, want.shape[-1])
    visual = VisualInputs(pixel_values=px_ours, tiles_per_item=visual_tiles)
    with reference_implementations():
        got = projector(encoder(visual), visual)
        assert projector.num_tokens(visual) == [4, 8, 12]  # (32/8 / 2)^2 = 4 tokens per tile
        assert got.shape == (24, TEXT["hidden_size"])
        assert ph.rel(got, want) <= ph.RTOL
        probe = torch.randn(want.shape, generator=torch.Generator().manual_seed(7))
        (got * probe).sum().backward()
    (want * probe).sum().backward()
    assert ph.rel(px_ours.grad, px_ref.grad) <= ph.RTOL
    ours = _forge_grads_as_hf(ctx, ("", encoder), ("projector.", projector))
    tower = "model.vision_tower."
    want = {
        **_ref_grads(ref, tower, strip=tower),
        **_ref_grads(ref, "model.multi_modal_projector.", strip="model."),
    }
    _assert_grads(ours, want)


@pytest.mark.parametrize("feature_layer", [-1, -2])
def test_mapping_round_trip_is_bit_exact(feature_layer):
    import transformers

    config = InternVisionConfig(
        **TINY,
        norm_type="layer_norm",
        use_qk_norm=True,
        post_norm=True,
        feature_layer=feature_layer,
    )
    hf_vision = {**_hf_vision_config(config), "use_mask_token": True}
    ref = transformers.InternVLVisionModel(transformers.InternVLVisionConfig(**hf_vision))
    _randomize(ref)
    projector = PixelShuffleProjector(
        PixelShuffleProjectorConfig(vision_hidden_size=32, text_hidden_size=48, patch_size=8)
    )
    hf = dict(ref.state_dict())
    hf.update({f"multi_modal_projector.{n}": t for n, t in _projector_hf(projector).items()})
    ctx = MAPPING.context(hf_vision, feature_layer=feature_layer)
    forge = dict(MAPPING.hf_to_forge(hf.items(), ctx))
    encoder = InternVisionEncoder(config)
    expected = list(encoder.state_dict()) + [f"projector.{n}" for n in projector.state_dict()]
    assert sorted(forge) == sorted(expected)
    assert sorted(MAPPING.forge_names(ctx)) == sorted(expected)
    MAPPING.check_hf(
        {n: t.shape for n, t in hf.items()},
        ctx,
        forge_shapes={
            **{n: t.shape for n, t in encoder.state_dict().items()},
            **{f"projector.{n}": t.shape for n, t in projector.state_dict().items()},
        },
    )
    back = dict(MAPPING.forge_to_hf(forge.items(), ctx))
    # every tensor but the mask token; with -2 the last block and layernorm carried unapplied
    assert sorted(back) == sorted(set(hf) - {"embeddings.mask_token"})
    for name, t in back.items():
        assert t.dtype == hf[name].dtype, name
        assert torch.equal(t, hf[name]), name
    if feature_layer == -2:  # a target with no place for them drops them on import
        assert isinstance(encoder.post_norm, UnappliedLayerNorm)
        drop = MAPPING.context(hf_vision, feature_layer=-2, carry_unapplied_layers=False)
        kept = dict(MAPPING.hf_to_forge(hf.items(), drop))
        assert sorted(kept) == sorted(
            n for n in forge if not n.startswith(("unapplied_blocks.", "post_norm."))
        )


def _projector_hf(projector: PixelShuffleProjector) -> dict:
    """The projector's weights under transformers' module names (random, informative)."""
    g = torch.Generator().manual_seed(11)
    names = {"norm": "layer_norm", "fc1": "linear_1", "fc2": "linear_2"}
    return {
        f"{names[n.split('.')[0]]}.{n.split('.')[1]}": torch.randn(t.shape, generator=g)
        for n, t in projector.state_dict().items()
    }


def test_configs_round_trip_through_hf_dicts():
    import transformers

    hf = transformers.InternVLVisionConfig(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=56, patch_size=14,
        norm_type="rms_norm", use_qk_norm=True, attention_bias=True, use_mean_pooling=False,
    ).to_dict()  # fmt: skip
    config = intern_vit_config_from_hf(
        hf, vision_feature_layer=-2, vision_feature_select_strategy="full"
    )
    assert (config.num_layers, config.num_built_layers, config.grid) == (3, 2, (4, 4))
    assert config.post_norm
    assert not config.applies_post_norm
    assert not config.drop_cls_token
    again = intern_vit_config_from_hf(
        intern_vit_config_to_hf(config),
        vision_feature_layer=-2,
        vision_feature_select_strategy="full",
    )
    assert again == config
    top = transformers.InternVLConfig(vision_config=hf, text_config=TEXT).to_dict()
    proj = pixel_shuffle_projector_config_from_hf(top)
    assert (proj.vision_hidden_size, proj.text_hidden_size, proj.patch_size, proj.scale) == (
        64, 48, 14, 2,
    )  # fmt: skip
    assert pixel_shuffle_projector_config_to_hf(proj) == {
        "downsample_ratio": 0.5,
        "projector_hidden_act": "gelu",
    }
    with pytest.raises(ValueError, match=r"set hidden_dropout_prob to 0\.0"):
        intern_vit_config_from_hf({**hf, "hidden_dropout_prob": 0.1})


def test_bad_inputs_raise_fix_it_errors():
    encoder = InternVisionEncoder(InternVisionConfig(**TINY))
    projector = PixelShuffleProjector(
        PixelShuffleProjectorConfig(vision_hidden_size=32, text_hidden_size=48, patch_size=8)
    )
    with pytest.raises(ValueError, match="not a multiple of the patch size 8x8"):
        encoder(VisualInputs(pixel_values=_pixels(1, 36, 32)))
    four = VisualInputs(pixel_values=_pixels(4, 32, 32), tiles_per_item=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"sums to 3 tiles, but pixel_values holds 4"):
        projector.num_tokens(four)
    with pytest.raises(ValueError, match=r"needs VisualInputs\.tiles_per_item"):
        projector.num_tokens(VisualInputs(pixel_values=_pixels(1, 32, 32)))
    odd = VisualInputs(pixel_values=_pixels(1, 24, 24), tiles_per_item=torch.tensor([1]))
    with pytest.raises(ValueError, match=r"3x3 patch grid, which does not divide into 2x2"):
        projector.num_tokens(odd)
    with pytest.raises(ValueError, match="does not divide into 2x2"):
        projector(torch.zeros(9, 32), odd)
    one = VisualInputs(pixel_values=_pixels(1, 32, 32), tiles_per_item=torch.tensor([1]))
    with pytest.raises(ValueError, match="drop_cls_token=True"):
        projector(torch.zeros(17, 32), one)  # CLS token kept
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        InternVisionConfig(**{**TINY, "num_heads": 3})
    with pytest.raises(ValueError, match="'layer_norm' or 'rms_norm'"):
        InternVisionConfig(**TINY, norm_type="batch_norm")
    with pytest.raises(ValueError, match="feature_layer=-4 is out of range"):
        InternVisionConfig(**TINY, feature_layer=-4)
    with pytest.raises(ValueError, match="1 / s for an integer s"):
        PixelShuffleProjectorConfig(
            vision_hidden_size=32, text_hidden_size=48, downsample_ratio=0.3
        )


def test_num_tokens_counts_video_frames_as_tiles():
    projector = PixelShuffleProjector(
        PixelShuffleProjectorConfig(vision_hidden_size=32, text_hidden_size=48, patch_size=8)
    )
    frames = VisualInputs(
        pixel_values=_pixels(5, 32, 48), tiles_per_item=torch.tensor([3, 2]), kind="video"
    )
    assert projector.num_tokens(frames) == [3 * 6, 2 * 6]  # 4x6 patches -> 2x3 tokens per frame


def test_init_weights_after_to_empty_is_seeded():
    config = InternVisionConfig(**TINY, norm_type="rms_norm", use_qk_norm=True, post_norm=True)
    proj_config = PixelShuffleProjectorConfig(vision_hidden_size=32, text_hidden_size=48)
    states = []
    for _ in range(2):
        with torch.device("meta"):
            encoder, projector = InternVisionEncoder(config), PixelShuffleProjector(proj_config)
        encoder.to_empty(device="cpu")
        projector.to_empty(device="cpu")
        encoder.init_weights(generator=torch.Generator().manual_seed(0))
        projector.init_weights(generator=torch.Generator().manual_seed(1))
        states.append({**encoder.state_dict(), **projector.state_dict()})
    for name, t in states[0].items():
        assert torch.equal(t, states[1][name]), name
        assert torch.isfinite(t).all(), name
    assert torch.all(states[0]["blocks.0.ls1"] == config.layer_scale_init_value)
    assert torch.all(states[0]["blocks.1.attn.q_norm.weight"] == 1)
    assert states[0]["pos_embed"].std() > 0.01
    assert torch.all(states[0]["fc1.bias"] == 0)
