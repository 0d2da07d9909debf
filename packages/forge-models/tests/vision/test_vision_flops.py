"""forge_models.vision_flops against a measured count: ``FlopCounterMode`` over tiny encoders and
projectors run forward and backward, with attention computed per segment (window, frame, tile
or image: the work of a variable-length kernel; the CPU dispatch computes dense masked scores
over the whole packed sequence, which is not what the formula, or flash-attn, counts)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from forge_models.vision import intern_vit, qwen2_5_vit, vit_blocks
from forge_models.vision.intern_vit import InternVisionConfig, InternVisionEncoder
from forge_models.vision.llava_onevision_projector import (
    LlavaOnevisionProjector,
    LlavaOnevisionProjectorConfig,
)
from forge_models.vision.pixel_shuffle_projector import (
    PixelShuffleProjector,
    PixelShuffleProjectorConfig,
)
from forge_models.vision.qwen2_5_merger import Qwen2_5MergerConfig, Qwen2_5VLPatchMerger
from forge_models.vision.qwen2_5_vit import Qwen2_5VisionConfig, Qwen2_5VisionEncoder
from forge_models.vision.siglip import SiglipVisionConfig, SiglipVisionEncoder
from forge_models.vision.siglip2 import Siglip2VisionConfig, Siglip2VisionEncoder
from forge_models.vision_flops import (
    PartFlops,
    encoder_flops,
    projector_flops,
    visual_flops,
    visual_flops_unsupported,
)
from forge_models.vlm import VisualInputs


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bidirectional attention of one segment ``[s, H, d]`` with explicit matmuls."""
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    probs = torch.softmax((q @ k.transpose(1, 2)) * q.shape[-1] ** -0.5, dim=-1)
    return (probs @ v).transpose(0, 1)


def segment_attention(q, k, v, *, causal=False, cu_seqlens=None, max_seqlen=None):
    """``forge_kernels.attention``'s contract for the encoders' calls, one segment at a time."""
    assert not causal
    if q.dim() == 4:  # [B, S, H, d]: each row a segment
        return torch.stack([_dense(q[b], k[b], v[b]) for b in range(q.shape[0])])
    bounds = cu_seqlens.tolist()
    return torch.cat([_dense(q[a:b], k[a:b], v[a:b]) for a, b in itertools.pairwise(bounds)])


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    """forge-kernels' eager references (no Triton interpreter on a CPU); none has a matmul."""
    monkeypatch.setenv("FORGE_KERNELS_IMPL", "reference")


@pytest.fixture
def per_segment(monkeypatch):
    for module in (qwen2_5_vit, vit_blocks, intern_vit):
        monkeypatch.setattr(module, "attention", segment_attention)


def _measured(encoder, projector, visual, *, vision_trains: bool, projector_trains: bool) -> int:
    encoder.requires_grad_(vision_trains)
    projector.requires_grad_(projector_trains)
    with FlopCounterMode(display=False) as counter:
        out = projector(encoder(visual), visual)
        if out.requires_grad:
            out.float().square().sum().backward()
    return counter.get_total_flops()


def _check(encoder, projector, visual, config, *, vision_name, projector_name):
    class _VLM:  # the VLMConfig fields visual_flops reads
        frozen = ()

    vlm = _VLM()
    vlm.vision, vlm.projector = encoder.config, config
    vlm.vision_name, vlm.projector_name = vision_name, projector_name
    assert visual_flops_unsupported(vlm) is None
    for frozen in ((), ("vision",), ("projector",), ("vision", "projector")):
        measured = _measured(
            encoder,
            projector,
            visual,
            vision_trains="vision" not in frozen,
            projector_trains="projector" not in frozen,
        )
        assert visual_flops(vlm, visual, frozen=frozen) == measured, frozen


def test_qwen2_5_vit_and_merger_with_partial_windows(per_segment):
    """Uneven windows (a 3 x 5 merge-unit frame in 2 x 2-unit windows), a two-frame video
    item, one full-attention block; all four freeze settings."""
    torch.manual_seed(0)
    vision = Qwen2_5VisionConfig(
        depth=3, hidden_size=32, intermediate_size=40, num_heads=2, patch_size=2,
        temporal_patch_size=2, spatial_merge_size=2, window_size=8, fullatt_block_indexes=(1,),
    )  # fmt: skip
    encoder = Qwen2_5VisionEncoder(vision)
    merger_config = Qwen2_5MergerConfig(vision_hidden_size=32, out_hidden_size=24)
    merger = Qwen2_5VLPatchMerger(merger_config)
    grid = torch.tensor([[1, 6, 10], [2, 4, 4]])
    visual = VisualInputs(
        pixel_values=torch.randn(int(grid.prod(1).sum()), vision.patch_dim), grid_thw=grid
    )
    _check(
        encoder, merger, visual, merger_config,
        vision_name="qwen2_5_vit", projector_name="qwen2_5_vl_merger",
    )  # fmt: skip
    # By hand: windows of the 3x5-unit frame: rows (2, 1) x cols (2, 2, 1) units of 4 patches.
    flops = encoder_flops(vision, visual)
    windows = sum((r * c * 4) ** 2 for r in (2, 1) for c in (2, 2, 1)) + 2 * 16**2
    frames = 60**2 + 2 * 16**2
    assert flops.attention == 4 * 32 * (frames + 2 * windows)
    assert flops.entry == 2 * 92 * vision.patch_dim * 32


def test_per_segment_attention_matches_the_dispatched_kernel(monkeypatch):
    """The measured count's attention computes what the encoder's real attention does."""
    torch.manual_seed(0)
    vision = Qwen2_5VisionConfig(
        depth=2, hidden_size=32, intermediate_size=40, num_heads=2, patch_size=2,
        window_size=8, fullatt_block_indexes=(1,),
    )  # fmt: skip
    encoder = Qwen2_5VisionEncoder(vision)
    grid = torch.tensor([[1, 6, 10]])
    visual = VisualInputs(pixel_values=torch.randn(60, vision.patch_dim), grid_thw=grid)
    expected = encoder(visual)
    monkeypatch.setattr(qwen2_5_vit, "attention", segment_attention)
    torch.testing.assert_close(encoder(visual), expected)


def test_siglip_with_llava_onevision_projector(per_segment):
    """Fixed-size tiles (trailing pixels dropped), a feature layer short of the last block."""
    torch.manual_seed(0)
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=48, num_layers=3, num_heads=2, patch_size=4,
        image_size=18, feature_layer=-2,
    )  # fmt: skip
    encoder = SiglipVisionEncoder(vision)
    config = LlavaOnevisionProjectorConfig(
        vision_hidden_size=32, text_hidden_size=24, image_size=18, patch_size=4,
        image_grid_pinpoints=((18, 36),),
    )  # fmt: skip
    projector = LlavaOnevisionProjector(config)
    visual = VisualInputs(
        pixel_values=torch.randn(3, 3, 18, 18), tiles_per_item=torch.tensor([2, 1]), kind="video"
    )
    _check(
        encoder, projector, visual, config,
        vision_name="siglip", projector_name="llava_onevision",
    )  # fmt: skip
    assert encoder_flops(vision, visual).attention == 4 * 32 * 2 * 3 * 16**2  # 2 blocks run


def test_intern_vit_with_pixel_shuffle_projector(per_segment):
    """The CLS token runs through the blocks; the patch embedding reads patches only."""
    torch.manual_seed(0)
    vision = InternVisionConfig(
        hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48, image_size=16,
        patch_size=4, use_qk_norm=True, attention_bias=True,
    )  # fmt: skip
    encoder = InternVisionEncoder(vision)
    config = PixelShuffleProjectorConfig(vision_hidden_size=32, text_hidden_size=24, patch_size=4)
    projector = PixelShuffleProjector(config)
    visual = VisualInputs(pixel_values=torch.randn(3, 3, 16, 16), tiles_per_item=torch.tensor([3]))
    _check(
        encoder, projector, visual, config,
        vision_name="intern_vit", projector_name="pixel_shuffle_mlp",
    )  # fmt: skip
    assert encoder_flops(vision, visual).attention == 4 * 32 * 2 * 3 * 17**2


def test_siglip2_variable_resolution(per_segment):
    """Images of their own patch grids, attention per image (no projector: the encoder's count
    alone, trained and frozen)."""
    torch.manual_seed(0)
    vision = Siglip2VisionConfig(
        hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2, patch_size=4,
        num_patches=16,
    )  # fmt: skip
    encoder = Siglip2VisionEncoder(vision)
    grid = torch.tensor([[1, 3, 5], [1, 4, 2]])
    visual = VisualInputs(pixel_values=torch.randn(23, 48), grid_thw=grid)
    flops = encoder_flops(vision, visual)
    assert flops.attention == 4 * 32 * 2 * (15**2 + 8**2)
    for trains in (True, False):
        encoder.requires_grad_(trains)
        with FlopCounterMode(display=False) as counter:
            out = encoder(visual)
            if trains:
                out.sum().backward()
        assert counter.get_total_flops() == flops.training(trainable=trains, input_grad=False)


def test_training_passes():
    """6x / 4x / 2x by what trains (the module docstring's table)."""
    part = PartFlops(entry=10, matmul=100, attention=1000)
    assert part.training(trainable=True, input_grad=True) == 3 * 1110
    assert part.training(trainable=True, input_grad=False) == 20 + 300 + 3000
    assert part.training(trainable=False, input_grad=True) == 2 * 110 + 3000
    assert part.training(trainable=False, input_grad=False) == part.forward == 1110


def test_unknown_component_is_named():
    class Custom:
        pass

    class _VLM:
        vision_name, vision = "my_vit", Custom()
        projector_name, projector = "qwen2_5_vl_merger", Qwen2_5MergerConfig()

    assert visual_flops_unsupported(_VLM()) == "no FLOP formula for the vision encoder 'my_vit'"
    with pytest.raises(ValueError, match="no FLOP formula for the vision encoder config Custom"):
        encoder_flops(Custom(), VisualInputs(pixel_values=torch.zeros(1, 3, 4, 4)))
    assert projector_flops(Qwen2_5MergerConfig(), VisualInputs(
        pixel_values=torch.zeros(4, 1), grid_thw=torch.tensor([[1, 2, 2]])
    )).matmul == 2 * 1 * (1280 * 4) * (1280 * 4 + 3584)  # fmt: skip
