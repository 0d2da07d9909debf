"""SiglipVisionEncoder + LlavaOnevisionProjector vs transformers' tiny
``LlavaOnevisionForConditionalGeneration``: ``get_image_features`` (AnyRes images of different
aspect ratios, with unpadding of rows and of columns, the anyres_max downscale, and single-tile
images) and ``get_video_features`` (2x pooling), values and every gradient at float32 within
1e-5, weights through forge-ckpt's ``siglip_vision`` mapping; placeholder counts vs the
``LlavaOnevisionProcessor`` logic. Nothing is downloaded."""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from forge_ckpt.mapping.families.siglip_vision import MAPPING as SPEC
from forge_core.testing import import_path
from forge_kernels.registry import reference_implementations
from forge_models.vision.llava_onevision_projector import (
    LlavaOnevisionProjector,
    llava_onevision_projector_config_from_hf,
    llava_onevision_projector_config_to_hf,
    select_best_resolution,
)
from forge_models.vision.siglip import SiglipVisionEncoder, siglip_config_from_hf
from forge_models.vlm import VisualInputs

ph = import_path(
    Path(__file__).parents[1] / "parity_helpers.py", "forge_models_tests_parity_helpers"
)
RTOL, rel = ph.RTOL, ph.rel

#: 21 px tiles of 7 px patches: 3 x 3 patches per tile (odd: the video pooling rounds up).
PINPOINTS = [[21, 21], [21, 42], [42, 21], [42, 42], [63, 84], [84, 42]]
CONFIG = {
    "vision_config": {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 21,
        "patch_size": 7,
        "vision_use_head": False,
    },
    "text_config": {
        "model_type": "qwen2",
        "hidden_size": 48,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 64,
    },
    "image_grid_pinpoints": PINPOINTS,
}
#: (height, width): 63x84 crops downscaled (anyres_max_9), 84x42 with columns unpadded, 63x84
#: with rows unpadded, then two single-tile images (a multi-image sample).
SIZES = [[90, 120], [100, 30], [30, 100], [50, 50], [40, 60]]
BATCH_NUM_IMAGES = [1, 1, 1, 2]
TILES = [13, 9, 13, 1, 1]


@pytest.fixture(scope="module")
def ref():
    import transformers

    torch.manual_seed(0)
    config = transformers.LlavaOnevisionConfig(**CONFIG)
    model = transformers.LlavaOnevisionForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # norm weights away from 1, biases away from 0: every one matters
        for name, p in model.model.named_parameters():
            if name.startswith("language_model"):
                continue
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def _hf_name(name: str) -> str | None:
    """A reference parameter's checkpoint name as the mapping writes it (tower names relative
    to the tower, projector names to the root), or None for the language model's."""
    name = name.removeprefix("model.")
    if name.startswith("vision_tower."):
        return name.removeprefix("vision_tower.")
    if name.startswith("multi_modal_projector.") or name == "image_newline":
        return name
    return None


def _hub_name(name: str) -> str:
    """The Hub (transformers 4.x) name of a tower tensor: one more ``vision_model.`` level."""
    projector = name == "image_newline" or name.startswith("multi_modal_projector.")
    return name if projector else f"vision_model.{name}"


@pytest.fixture(scope="module")
def forge(ref):
    """Encoder and projector with the reference's weights, loaded through the mapping."""
    hf = ref.config.to_dict()
    encoder = SiglipVisionEncoder(
        siglip_config_from_hf(hf["vision_config"], feature_layer=hf["vision_feature_layer"])
    )
    projector = LlavaOnevisionProjector(llava_onevision_projector_config_from_hf(hf))
    state = {_hf_name(n): t for n, t in ref.state_dict().items() if _hf_name(n)}
    ctx = SPEC.context(
        hf["vision_config"],
        feature_layer=hf["vision_feature_layer"],
        projector_bias=hf["multimodal_projector_bias"],
        **SPEC.detect_context(state),
    )
    weights = dict(SPEC.hf_to_forge(state.items(), ctx))
    encoder.load_state_dict({n: t for n, t in weights.items() if not n.startswith("projector.")})
    projector.load_state_dict(
        {n.removeprefix("projector."): t for n, t in weights.items() if n.startswith("projector.")}
    )
    return SimpleNamespace(encoder=encoder, projector=projector, ctx=ctx)


def _run_forge(forge, visual: VisualInputs) -> torch.Tensor:
    forge.encoder.zero_grad(set_to_none=True)
    forge.projector.zero_grad(set_to_none=True)
    with reference_implementations():
        return forge.projector(forge.encoder(visual), visual)


def _backward(out: torch.Tensor, want: torch.Tensor) -> None:
    probe = torch.randn(want.shape, generator=torch.Generator().manual_seed(9))
    with reference_implementations():
        (out * probe).sum().backward()
    (want * probe).sum().backward()


def _assert_grads(forge, ref) -> None:
    params = [*forge.encoder.named_parameters()]
    params += [(f"projector.{n}", p) for n, p in forge.projector.named_parameters()]
    carried = dict(forge.encoder.named_buffers())  # post_layernorm, unapplied at layer -1
    assert sorted(carried) == ["post_layernorm.bias", "post_layernorm.weight"]
    tensors = {n: p.grad for n, p in params} | carried
    ours = dict(SPEC.forge_to_hf(tensors.items(), forge.ctx))
    ours = {n: g for n, g in ours.items() if "post_layernorm" not in n}
    theirs = {
        _hf_name(n): p.grad for n, p in ref.named_parameters() if _hf_name(n) and p.grad is not None
    }
    assert sorted(ours) == sorted(theirs)  # transformers' post_layernorm got no gradient
    for name, grad in theirs.items():
        if name.endswith("k_proj.bias"):  # zero up to rounding: softmax ignores q . b_k
            scale = theirs[name.replace("k_proj.bias", "q_proj.bias")].norm()
            assert max(ours[name].norm(), grad.norm()) <= 1e-4 * scale, name
            continue
        assert rel(ours[name], grad) <= RTOL, (name, rel(ours[name], grad))


def _processor():
    """transformers' ``LlavaOnevisionProcessor`` placeholder logic, on this model's config
    (its methods on a stand-in object, so no tokenizer is needed)."""
    from transformers.models.llava_onevision.processing_llava_onevision import (
        LlavaOnevisionProcessor as P,
    )

    proc = SimpleNamespace(
        image_processor=SimpleNamespace(image_grid_pinpoints=PINPOINTS),
        num_image_tokens=3 * 3,  # (image_size // patch_size) ** 2
        vision_aspect_ratio="anyres_max_9",
        vision_feature_select_strategy="full",
        image_token="I",
        video_token="V",
    )
    proc._get_unpadded_features = functools.partial(P._get_unpadded_features, proc)
    proc._get_number_of_features = functools.partial(P._get_number_of_features, proc)
    return proc, P


def test_image_features_match_transformers(ref, forge):
    pixels = torch.randn(sum(TILES), 3, 21, 21, generator=torch.Generator().manual_seed(1))
    ref_pixels = pixels.clone().requires_grad_()
    pixels.requires_grad_()
    sizes = torch.tensor(SIZES)
    ref.zero_grad(set_to_none=True)
    want = ref.model.get_image_features(
        ref_pixels, sizes, batch_num_images=torch.tensor(BATCH_NUM_IMAGES)
    ).pooler_output
    visual = VisualInputs(
        pixel_values=pixels, image_sizes=sizes, tiles_per_item=torch.tensor(TILES)
    )
    got = _run_forge(forge, visual)

    counts = forge.projector.num_tokens(visual)
    assert counts == [len(t) for t in want]
    proc, P = _processor()
    inputs = {"batch_num_images": BATCH_NUM_IMAGES, "image_sizes": SIZES, "pixel_values": [pixels]}
    assert counts == [len(P.replace_image_token(proc, inputs, k)) for k in range(len(SIZES))]

    want = torch.cat(want)
    assert rel(got, want) <= RTOL
    _backward(got, want)
    _assert_grads(forge, ref)
    assert rel(pixels.grad, ref_pixels.grad) <= RTOL


def test_video_features_match_transformers(ref, forge):
    frames = [2, 3]  # videos of different lengths in one call (the reference: one call each)
    pixels = torch.randn(sum(frames), 3, 21, 21, generator=torch.Generator().manual_seed(2))
    ref_pixels = pixels.clone().requires_grad_()
    pixels.requires_grad_()
    ref.zero_grad(set_to_none=True)
    want = [
        ref.model.get_video_features(video[None]).pooler_output[0]
        for video in ref_pixels.split(frames)
    ]
    visual = VisualInputs(pixel_values=pixels, tiles_per_item=torch.tensor(frames), kind="video")
    got = _run_forge(forge, visual)

    counts = forge.projector.num_tokens(visual)
    assert counts == [len(t) for t in want] == [f * 2 * 2 + 1 for f in frames]
    proc, P = _processor()
    inputs = {"pixel_values_videos": list(pixels.split(frames))}
    assert counts == [len(P.replace_video_token(proc, inputs, k)) for k in range(len(frames))]

    want = torch.cat(want)
    assert rel(got, want) <= RTOL
    _backward(got, want)
    _assert_grads(forge, ref)
    assert rel(pixels.grad, ref_pixels.grad) <= RTOL


def test_mapping_round_trip_with_projector(ref, forge):
    state = {_hf_name(n): t for n, t in ref.state_dict().items() if _hf_name(n)}
    for hub_layout in (False, True):  # transformers 5.x's tower names, then the Hub's
        if hub_layout:
            state = {_hub_name(n): t for n, t in state.items()}
        ctx = SPEC.context(ref.config.vision_config.to_dict(), **SPEC.detect_context(state))
        assert ctx["vision_model_prefix"] is hub_layout
        forge_shapes = {n: t.shape for n, t in forge.encoder.state_dict().items()}
        forge_shapes |= {f"projector.{n}": t.shape for n, t in forge.projector.state_dict().items()}
        SPEC.check_hf({n: t.shape for n, t in state.items()}, ctx, forge_shapes=forge_shapes)
        weights = dict(SPEC.hf_to_forge(state.items(), ctx))
        assert sorted(weights) == sorted(forge_shapes)
        back = dict(SPEC.forge_to_hf(weights.items(), ctx))
        assert sorted(back) == sorted(state)  # post_layernorm too, carried unapplied
        assert all(torch.equal(back[n], state[n]) for n in back)


def test_num_tokens_from_metadata_and_errors(forge):
    projector = forge.projector
    sizes = torch.tensor(SIZES[:3])
    anyres = VisualInputs(pixel_values=torch.empty(0), image_sizes=sizes)
    assert projector.num_tokens(anyres) == projector.num_tokens(
        VisualInputs(
            pixel_values=torch.empty(0), image_sizes=sizes, tiles_per_item=torch.tensor(TILES[:3])
        )
    )
    assert select_best_resolution(90, 120, PINPOINTS) == (63, 84)
    with pytest.raises(ValueError, match="has 5 tiles, but AnyRes"):
        projector.num_tokens(replace(anyres, tiles_per_item=torch.tensor([13, 5, 13])))
    with pytest.raises(ValueError, match=r"needs VisualInputs\.image_sizes"):
        projector.num_tokens(
            VisualInputs(
                pixel_values=torch.empty(0), tiles_per_item=torch.ones(2, dtype=torch.long)
            )
        )
    with pytest.raises(ValueError, match=r"needs VisualInputs\.tiles_per_item"):
        projector.num_tokens(
            VisualInputs(pixel_values=torch.empty(0), image_sizes=sizes, kind="video")
        )
    with pytest.raises(ValueError, match="expects features"):
        projector(torch.zeros(34 * 9, 32), anyres)


def test_projector_config_round_trip_and_validation(ref):
    hf = ref.config.to_dict()
    config = llava_onevision_projector_config_from_hf(hf)
    assert config.max_num_patches == 9
    assert config.patches_per_tile == 9
    assert (
        llava_onevision_projector_config_from_hf(llava_onevision_projector_config_to_hf(config))
        == config
    )
    with pytest.raises(ValueError, match="no CLS"):
        llava_onevision_projector_config_from_hf(
            {**hf, "vision_feature_select_strategy": "default"}
        )
    with pytest.raises(ValueError, match="concatenating several layers"):
        llava_onevision_projector_config_from_hf({**hf, "vision_feature_layer": [-2, -1]})
    with pytest.raises(ValueError, match="anyres_max_N"):
        llava_onevision_projector_config_from_hf({**hf, "vision_aspect_ratio": "pad"})
    with pytest.raises(ValueError, match="multiples of image_size=21"):
        replace(config, image_grid_pinpoints=((21, 30),))
