"""A micro-batch's images and videos go through the vision encoder in ONE call
(``VisionLanguageModel.encode_visual``), so every data-parallel rank makes one encoder call per
micro-batch whatever it holds (images, videos, both, or the text-only stand-in): under FSDP of
the encoder, two calls on one rank against one on its peer were a collective mismatch.

- Qwen2.5-VL (a projector that reads no kind): one encoder and one projector call; the loss and
  every gradient equal two separate calls within float32 rounding (not bit for bit: a GEMM
  rounds a row differently at another row count), and images-only / videos-only / text-only
  micro-batches are bit for bit the separate calls' (the same calls).
- LLaVA-OneVision (a projector that pools video frames): one encoder call, the projector once
  per kind on every micro-batch, a zero-weight stand-in for the missing kind, so the loss and
  gradients of an images-only or text-only micro-batch stay bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from forge_kernels.registry import reference_implementations
from forge_models.vlm import VisualInputs, build_vlm, vlm_config_from_dict

IMAGE, VIDEO, START = 90, 91, 92
QWEN = {
    "vision": {
        "name": "qwen2_5_vit", "depth": 2, "hidden_size": 32, "intermediate_size": 48,
        "num_heads": 2, "patch_size": 2, "temporal_patch_size": 2, "spatial_merge_size": 2,
        "window_size": 8, "fullatt_block_indexes": [1],
    },
    "projector": {"name": "qwen2_5_vl_merger"},
    "text": {"size": "qwen2-debug", "vocab_size": 100, "mrope_section": [2, 3, 3]},
    "image_token_id": IMAGE, "video_token_id": VIDEO, "vision_start_token_id": START,
}  # fmt: skip
LLAVA = {
    "vision": {
        "name": "siglip", "hidden_size": 32, "intermediate_size": 48, "num_layers": 2,
        "num_heads": 2, "patch_size": 14, "image_size": 28,
    },
    "projector": {"name": "llava_onevision", "image_grid_pinpoints": [[28, 28], [28, 56]]},
    "text": {"size": "qwen2-debug", "vocab_size": 100},
    "image_token_id": IMAGE, "video_token_id": VIDEO,
}  # fmt: skip


@pytest.fixture(autouse=True)
def _eager_kernels():
    with reference_implementations():
        yield


def _qwen_visual(grid, seed, **extra) -> VisualInputs:
    grid = torch.tensor(grid)
    pixels = torch.randn(int(grid.prod(1).sum()), 24, generator=torch.Generator().manual_seed(seed))
    return VisualInputs(pixel_values=pixels, grid_thw=grid, **extra)


def _llava_visual(tiles, seed, **extra) -> VisualInputs:
    pixels = torch.randn(sum(tiles), 3, 28, 28, generator=torch.Generator().manual_seed(seed))
    return VisualInputs(pixel_values=pixels, tiles_per_item=torch.tensor(tiles), **extra)


def _cases(family: str) -> dict[str, dict]:
    """``{"images" | "videos" | "both": {"images": ..., "videos": ...}}`` of ``family``."""
    if family == "qwen":
        images = _qwen_visual([[1, 4, 4], [1, 2, 4]], 1)
        videos = _qwen_visual([[2, 4, 2]], 2, kind="video", second_per_grid_ts=torch.tensor([0.5]))
    else:
        images = _llava_visual([1, 1], 1, image_sizes=torch.tensor([[28, 28], [28, 28]]))
        videos = _llava_visual([3], 2, kind="video")
    return {
        "images": {"images": images},
        "videos": {"videos": videos},
        "both": {"images": images, "videos": videos},
    }


def _ids(model, visual: dict) -> torch.Tensor:
    """One row: text, then each kind's placeholders (wrapped in vision-start tokens)."""
    parts = [torch.arange(1, 6)]
    for key, token in (("images", IMAGE), ("videos", VIDEO)):
        if key in visual:
            for n in model.num_visual_tokens(visual[key]):
                parts += [torch.tensor([START]), torch.full((n,), token), torch.arange(7, 10)]
    return torch.cat(parts)[None]


def _separate(model, ids: torch.Tensor, visual: dict) -> torch.Tensor:
    """The loss as the model computed it before the joined call: one encoder and projector
    call per kind."""
    scatter = [
        (ids == token, model.visual_features(visual[key]))
        for key, token in (("images", IMAGE), ("videos", VIDEO))
        if key in visual
    ]
    positions = None
    if model.config.text.mrope_section is not None:
        positions = model.mrope_positions(ids, **visual)
    return model.language_model(ids, positions, labels=ids, embeds_scatter=scatter)


def _loss_and_grads(model, loss: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """``loss`` and the gradients it gives every parameter (``None``: no gradient)."""
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    return loss.detach(), grads


def _count_calls(module: torch.nn.Module, counts: list[int]):
    return module.register_forward_pre_hook(lambda *_: counts.__setitem__(0, counts[0] + 1))


@pytest.mark.parametrize("family", ["qwen", "llava"])
def test_one_encoder_call_per_micro_batch_matches_separate_calls(family):
    torch.manual_seed(0)
    model = build_vlm(vlm_config_from_dict(QWEN if family == "qwen" else LLAVA))
    vision_calls, projector_calls = [0], [0]
    hooks = [
        _count_calls(model.vision, vision_calls),
        _count_calls(model.projector, projector_calls),
    ]
    cases = _cases(family)
    # A text-only micro-batch runs its stand-in image (LLaVA-OV: and a stand-in video).
    cases["text"] = {"dummy_visual": cases["images"]["images"]}
    for name, visual in cases.items():
        ids = _ids(model, visual)
        vision_calls[0] = projector_calls[0] = 0
        joined = _loss_and_grads(model, model(ids, labels=ids, **visual))
        assert vision_calls[0] == 1, (name, vision_calls)
        # Qwen's merger takes both kinds at once; LLaVA-OV's projector runs once per kind.
        assert projector_calls[0] == (1 if family == "qwen" else 2), (name, projector_calls)
        if name == "text":
            separate = _loss_and_grads(model, model.language_model(ids, labels=ids))
        else:
            separate = _loss_and_grads(model, _separate(model, ids, visual))
        if name == "both":  # one call over more rows: float32 rounding of the matrix products
            torch.testing.assert_close(joined[0], separate[0], rtol=1e-6, atol=1e-6)
            for n, g in joined[1].items():
                torch.testing.assert_close(g, separate[1][n], rtol=1e-5, atol=1e-7, msg=n)
            continue
        # The same calls (plus zero-weight stand-ins): bit for bit.
        assert torch.equal(joined[0], separate[0]), name
        for n, g in joined[1].items():
            if separate[1][n] is None:  # text-only: the encoder's zeros instead of none
                assert not g.any(), (name, n)
            else:
                assert torch.equal(g, separate[1][n]), (name, n)
    for hook in hooks:
        hook.remove()


def test_join_refuses_pixel_rows_of_another_layout():
    images = _qwen_visual([[1, 2, 2]], 1)
    frames = VisualInputs(pixel_values=torch.zeros(4, 12), grid_thw=torch.tensor([[1, 2, 2]]))
    with pytest.raises(
        ValueError, match=r"pixel_values rows differ \(images \[24\], images \[12\]"
    ):
        VisualInputs.join([images, frames])
    joined = VisualInputs.join([images, _qwen_visual([[2, 2, 2]], 2, kind="video")])
    assert joined.grid_thw.tolist() == [[1, 2, 2], [2, 2, 2]]
    assert joined.pixel_values.shape == (12, 24)
