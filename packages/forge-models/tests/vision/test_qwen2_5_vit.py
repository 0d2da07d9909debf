"""Qwen2.5-VL vision encoder + patch merger against transformers, and their checkpoint mapping.

The reference is transformers' ``Qwen2_5_VisionTransformerPretrainedModel`` built from a tiny
config with random weights (nothing downloaded); its weights reach forge through the
``qwen2_5_vl_vision`` forge-ckpt mapping. The batch mixes images of different sizes and a video,
and the window size splits the grids into several windows, so window and full attention differ.
"""

from __future__ import annotations

import pytest
import torch

from forge_ckpt.mapping.families.qwen2_5_vl_vision import MAPPING
from forge_kernels.registry import reference_implementations
from forge_models.vision.qwen2_5_merger import (
    Qwen2_5MergerConfig,
    Qwen2_5VLPatchMerger,
    qwen2_5_merger_config_from_hf,
    qwen2_5_merger_config_to_hf,
)
from forge_models.vision.qwen2_5_vit import (
    Qwen2_5VisionConfig,
    Qwen2_5VisionEncoder,
    qwen2_5_vision_config_from_hf,
    qwen2_5_vision_config_to_hf,
    qwen2_5_vision_layout,
)
from forge_models.vlm.inputs import VisualInputs

RTOL = 1e-5

HF_CONFIG = {
    "depth": 4,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_heads": 2,
    "in_channels": 3,
    "patch_size": 2,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "window_size": 8,  # 2 x 2 merge units per window
    "out_hidden_size": 40,
    "fullatt_block_indexes": [1, 3],
}

# Three images of different sizes (not multiples of the window) and a 2-frame video.
IMAGES = [[1, 6, 10], [1, 4, 4], [1, 10, 2]]
VIDEO = [[2, 8, 6]]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def visual_inputs(grid: list[list[int]], seed: int = 0) -> VisualInputs:
    grid_thw = torch.tensor(grid)
    patches = int(grid_thw.prod(1).sum())
    width = 3 * 2 * 2 * 2
    pixels = torch.randn(patches, width, generator=torch.Generator().manual_seed(seed))
    return VisualInputs(pixel_values=pixels, grid_thw=grid_thw)


@pytest.fixture(scope="module")
def pair():
    """(reference tower, forge encoder, forge merger, mapping context) with shared weights."""
    from transformers import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
    )

    torch.manual_seed(0)
    hf_config = Qwen2_5_VLVisionConfig(**HF_CONFIG)
    ref = Qwen2_5_VisionTransformerPretrainedModel(hf_config).float().eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: make every parameter matter
        for name, p in ref.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    hf_dict = hf_config.to_dict()
    encoder = Qwen2_5VisionEncoder(qwen2_5_vision_config_from_hf(hf_dict))
    merger = Qwen2_5VLPatchMerger(qwen2_5_merger_config_from_hf(hf_dict))
    ctx = MAPPING.context(hf_dict)
    state = dict(MAPPING.hf_to_forge(ref.state_dict().items(), ctx))
    encoder.load_state_dict({k: v for k, v in state.items() if not k.startswith("projector.")})
    merger.load_state_dict(
        {k.removeprefix("projector."): v for k, v in state.items() if k.startswith("projector.")}
    )
    return ref, encoder, merger, ctx


def test_matches_transformers_outputs_and_gradients(pair):
    ref, encoder, merger, ctx = pair
    for module in (ref, encoder, merger):
        module.zero_grad(set_to_none=True)
    visual = visual_inputs(IMAGES + VIDEO)  # the encoder treats image and video items alike
    pixels_ref = visual.pixel_values.clone().requires_grad_()
    pixels = visual.pixel_values.clone().requires_grad_()
    expected = ref(pixels_ref, grid_thw=visual.grid_thw).pooler_output
    with reference_implementations():
        inputs = VisualInputs(pixel_values=pixels, grid_thw=visual.grid_thw)
        out = merger(encoder(inputs), inputs)
    assert out.shape == expected.shape == (sum(merger.num_tokens(inputs)), 40)
    assert rel(out, expected) <= RTOL

    probe = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
    (expected * probe).sum().backward()
    with reference_implementations():
        (out * probe).sum().backward()
    assert rel(pixels.grad, pixels_ref.grad) <= RTOL

    named = [(n, p.grad) for n, p in encoder.named_parameters()]
    named += [(f"projector.{n}", p.grad) for n, p in merger.named_parameters()]
    grads = dict(MAPPING.forge_to_hf(named, ctx))
    assert set(grads) == {n for n, _ in ref.named_parameters()}
    for name, p in ref.named_parameters():
        assert rel(grads[name], p.grad) <= RTOL, name


def test_windows_split_the_grids_and_restore_the_order():
    config = qwen2_5_vision_config_from_hf(HF_CONFIG)
    grid = torch.tensor(IMAGES + VIDEO)
    layout = qwen2_5_vision_layout(grid, spatial_merge_size=2, window_units=config.window_units)
    frames = int(grid[:, 0].sum())
    assert len(layout.cu_windows) - 1 > 2 * frames  # the windows split the frames
    assert layout.cu_frames.tolist()[-1] == layout.cu_windows.tolist()[-1] == grid.prod(1).sum()
    total = layout.window_order.numel()
    assert sorted(layout.window_order.tolist()) == list(range(total))
    assert torch.equal(layout.window_order[layout.restore_order], torch.arange(total))
    # Each merge unit (4 consecutive patches) stays together in window order.
    units = layout.window_order.view(-1, 4)
    assert torch.equal(units - units[:, :1], torch.arange(4).expand_as(units))
    # A window is at most 2 x 2 merge units and never crosses a frame.
    assert max(torch.diff(layout.cu_windows).tolist()) <= 16
    assert set(layout.cu_frames.tolist()) <= set(layout.cu_windows.tolist())


def test_checkpoint_mapping_round_trip_and_names(pair):
    ref, encoder, merger, ctx = pair
    hf_state = ref.state_dict()
    forge_state = dict(MAPPING.hf_to_forge(hf_state.items(), ctx))
    expected = set(encoder.state_dict()) | {f"projector.{k}" for k in merger.state_dict()}
    assert set(forge_state) == expected == set(MAPPING.forge_names(ctx))
    back = dict(MAPPING.forge_to_hf(forge_state.items(), ctx))
    assert set(back) == set(hf_state)
    for name, tensor in hf_state.items():
        assert torch.equal(back[name], tensor), name


def test_config_round_trip_and_legacy_keys():
    from transformers import Qwen2_5_VLVisionConfig

    config = qwen2_5_vision_config_from_hf(HF_CONFIG)
    assert qwen2_5_vision_config_from_hf(qwen2_5_vision_config_to_hf(config)) == config
    merger = qwen2_5_merger_config_from_hf(HF_CONFIG)
    assert merger == Qwen2_5MergerConfig(vision_hidden_size=32, out_hidden_size=40)
    assert qwen2_5_merger_config_from_hf(qwen2_5_merger_config_to_hf(merger)) == merger
    # What forge writes, transformers reads back as the same tower.
    written = qwen2_5_vision_config_to_hf(config) | qwen2_5_merger_config_to_hf(merger)
    hf = Qwen2_5_VLVisionConfig(**written).to_dict()
    assert qwen2_5_vision_config_from_hf(hf) == config
    assert qwen2_5_merger_config_from_hf(hf) == merger
    # The released config.json files use in_chans / spatial_patch_size and omit rope settings.
    legacy = {k: v for k, v in HF_CONFIG.items() if k not in ("in_channels", "patch_size")}
    legacy |= {"in_chans": 3, "spatial_patch_size": 2, "tokens_per_second": 2}
    assert qwen2_5_vision_config_from_hf(legacy) == config
    with pytest.raises(ValueError, match="axial"):
        qwen2_5_vision_config_from_hf(HF_CONFIG | {"rope_parameters": {"rope_type": "yarn"}})


def test_init_weights_after_to_empty():
    config = qwen2_5_vision_config_from_hf(HF_CONFIG)
    with torch.device("meta"):
        encoder = Qwen2_5VisionEncoder(config)
        merger = Qwen2_5VLPatchMerger(qwen2_5_merger_config_from_hf(HF_CONFIG))
    states = []
    for _ in range(2):
        encoder.to_empty(device="cpu")
        merger.to_empty(device="cpu")
        encoder.init_weights(generator=torch.Generator().manual_seed(3))
        merger.init_weights(generator=torch.Generator().manual_seed(3))
        states.append({**encoder.state_dict(), **merger.state_dict()})
    for name, tensor in states[0].items():
        assert torch.equal(tensor, states[1][name]), name  # seeded: reproducible
        if name.endswith("bias"):
            assert not tensor.any(), name
        elif "norm" in name:
            assert torch.equal(tensor, torch.ones_like(tensor)), name
        else:
            assert 0.01 < tensor.std().item() < 0.03, name


def test_bad_inputs_say_how_to_fix(pair):
    _, encoder, merger, _ = pair
    good = visual_inputs(IMAGES)
    with pytest.raises(ValueError, match="divisible by spatial_merge_size"):
        encoder(visual_inputs([[1, 6, 5]]))
    with pytest.raises(ValueError, match="divisible by spatial_merge_size"):
        merger.num_tokens(
            VisualInputs(pixel_values=good.pixel_values, grid_thw=torch.tensor([[1, 3, 4]]))
        )
    with pytest.raises(ValueError, match="pixel_values has 60 rows"):
        encoder(VisualInputs(pixel_values=good.pixel_values[:60], grid_thw=good.grid_thw))
    with pytest.raises(ValueError, match=r"C\*T\*P\*P"):
        encoder(VisualInputs(pixel_values=good.pixel_values[:, :12], grid_thw=good.grid_thw))
    with pytest.raises(ValueError, match=r"needs VisualInputs\.grid_thw"):
        encoder(VisualInputs(pixel_values=good.pixel_values))
    with pytest.raises(ValueError, match="vision_hidden_size equals the encoder's hidden_size"):
        merger(torch.zeros(good.pixel_values.shape[0], 16), good)
    with pytest.raises(ValueError, match="window_size"):
        Qwen2_5VisionConfig(
            **(qwen2_5_vision_config_from_hf(HF_CONFIG).__dict__ | {"window_size": 3})
        )
    with pytest.raises(ValueError, match="fullatt_block_indexes"):
        Qwen2_5VisionConfig(depth=2, fullatt_block_indexes=(1, 2))
