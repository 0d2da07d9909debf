"""Qwen2.5-VL end to end against transformers: a tiny ``Qwen2_5_VLForConditionalGeneration``
with random weights, saved and loaded through ``forge_models.from_pretrained``; two documents
(several images of different sizes; a video) packed in one row on the forge side, run one by
one on the reference side. Logits, every parameter gradient and the pixel gradients match in
float32; ``save_pretrained`` writes a folder transformers loads to the same logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import forge_models
from forge_core.testing import import_path
from forge_kernels.registry import reference_implementations
from forge_models.vlm import VisualInputs

ph = import_path(Path(__file__).parent.with_name("parity_helpers.py"), "forge_models_tests_ph_vlm")

IMAGE, VIDEO, START, END = 90, 91, 92, 93
VOCAB = 100
CONFIG = {
    "vision_config": {
        "depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2,
        "in_channels": 3, "patch_size": 2, "temporal_patch_size": 2, "spatial_merge_size": 2,
        "window_size": 8, "out_hidden_size": 48, "fullatt_block_indexes": [1],
    },
    "text_config": {
        "vocab_size": VOCAB, "hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 3]},
    },
    "image_token_id": IMAGE, "video_token_id": VIDEO,
    "vision_start_token_id": START, "vision_end_token_id": END,
}  # fmt: skip
PATCH_WIDTH = 3 * 2 * 2 * 2


def _token_types(ids: torch.Tensor) -> torch.Tensor:
    """transformers 5 builds M-RoPE positions only given the processor's token types."""
    return (ids == IMAGE).int() + 2 * (ids == VIDEO).int()


@pytest.fixture(autouse=True)
def _eager_kernels():
    with reference_implementations():
        yield


def _visual(grid, seed, **extra) -> VisualInputs:
    grid = torch.tensor(grid)
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(int(grid.prod(1).sum()), PATCH_WIDTH, generator=gen)
    return VisualInputs(pixel_values=pixels.requires_grad_(), grid_thw=grid, **extra)


def _document(parts, seed) -> torch.Tensor:
    """Text runs and ``(token, count)`` visual runs wrapped in vision start/end tokens."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for part in parts:
        if isinstance(part, int):
            out.append(torch.randint(1, 80, (part,), generator=gen))
        else:
            token, count = part
            out.append(torch.tensor([START] + [token] * count + [END]))
    return torch.cat(out)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    with reference_implementations():
        return ph.HFPair(
            "Qwen2_5_VLConfig",
            "Qwen2_5_VLForConditionalGeneration",
            CONFIG,
            tmp_path_factory.mktemp("qwen2_5_vl"),
        )


def test_packed_images_and_video_match_transformers(pair):
    model, ref = pair.model, pair.ref
    assert type(model).__name__ == "VisionLanguageModel"
    assert model.config.family == "qwen2_5_vl"
    images = _visual([[1, 4, 6], [1, 2, 4]], seed=1)
    videos = _visual([[2, 4, 4]], seed=2, second_per_grid_ts=torch.tensor([0.5]))
    doc_a = _document([5, (IMAGE, 6), 3, (IMAGE, 2), 4], seed=3)
    doc_b = _document([3, (VIDEO, 8), 6], seed=4)
    packed = torch.cat([doc_a, doc_b])[None]
    cu = torch.tensor([0, len(doc_a), len(doc_a) + len(doc_b)])
    probe = ph.probe(VOCAB, (len(packed[0]),), seed=5)

    pair.zero_grad()
    logits = model(packed, cu_seqlens=cu, images=images, videos=videos)
    (logits[0] * probe).sum().backward()

    ref_images = images.pixel_values.detach().clone().requires_grad_()
    ref_videos = videos.pixel_values.detach().clone().requires_grad_()
    out_a = ref(
        input_ids=doc_a[None], pixel_values=ref_images, image_grid_thw=images.grid_thw,
        mm_token_type_ids=_token_types(doc_a[None]),
    ).logits[0]  # fmt: skip
    out_b = ref(
        input_ids=doc_b[None], pixel_values_videos=ref_videos, video_grid_thw=videos.grid_thw,
        second_per_grid_ts=videos.second_per_grid_ts, mm_token_type_ids=_token_types(doc_b[None]),
    ).logits[0]  # fmt: skip
    ref_logits = torch.cat([out_a, out_b])
    (ref_logits * probe).sum().backward()

    assert ph.rel(logits[0], ref_logits) <= ph.RTOL
    assert ph.rel(images.pixel_values.grad, ref_images.grad) <= ph.RTOL
    assert ph.rel(videos.pixel_values.grad, ref_videos.grad) <= ph.RTOL
    pair.assert_grads_match(hf_layout="modules")  # named as the reference's parameters


def test_save_pretrained_loads_in_transformers(pair, tmp_path):
    import transformers

    out = forge_models.save_pretrained(pair.model, tmp_path / "out")
    reloaded = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
    images = _visual([[1, 4, 4]], seed=6)
    ids = _document([4, (IMAGE, 4), 3], seed=7)[None]
    with torch.no_grad():
        ours = pair.model(ids, images=images)
        theirs = reloaded(
            input_ids=ids, pixel_values=images.pixel_values, image_grid_thw=images.grid_thw,
            mm_token_type_ids=_token_types(ids),
        )  # fmt: skip
    assert ph.rel(ours, theirs.logits) <= ph.RTOL


def _flatten(hf_dir: Path, out: Path, **root) -> Path:
    """``hf_dir`` with the original Qwen2.5-VL ``config.json`` layout: the text settings at the
    root (no ``text_config``, M-RoPE in ``rope_scaling``), the weights linked."""
    import json

    out.mkdir()
    for file in hf_dir.iterdir():
        if file.name != "config.json":
            (out / file.name).symlink_to(file)
    config = json.loads((hf_dir / "config.json").read_text())
    text = config.pop("text_config")
    text.pop("model_type", None)
    rope = text.pop("rope_parameters")
    scaling = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    flat = {**text, **config, "rope_theta": rope["rope_theta"], "rope_scaling": scaling, **root}
    (out / "config.json").write_text(json.dumps(flat))
    return out


def test_flat_config_json_loads_and_matches_transformers(pair, tmp_path):
    """The original uploads' layout (text settings at the root) reads through the qwen2 text
    family (it used to pick the VLM family again for the text model: RecursionError)."""
    model = forge_models.from_pretrained(_flatten(Path(pair.hf_dir), tmp_path / "flat"))
    assert model.config.text.mrope_section == (2, 1, 3)
    assert model.config.text.hidden_size == 48
    images = _visual([[1, 4, 6]], seed=10)
    ids = _document([3, (IMAGE, 6), 4], seed=11)[None]
    with torch.no_grad():
        ours = model(ids, images=images)
        theirs = pair.ref(
            input_ids=ids, pixel_values=images.pixel_values, image_grid_thw=images.grid_thw,
            mm_token_type_ids=_token_types(ids),
        ).logits  # fmt: skip
    assert ph.rel(ours, theirs) <= ph.RTOL


def test_text_settings_of_an_unknown_vlm_type_are_a_clear_error(pair, tmp_path):
    import json

    from forge_models.vlm.hf_text import text_config_from_vlm_hf

    flat = _flatten(Path(pair.hf_dir), tmp_path / "flat")
    settings = json.loads((flat / "config.json").read_text())
    with pytest.raises(ValueError, match=r"vision-language family .*text_config"):
        # as the families call it: forge-ckpt's view of the root (a flat file's model_type)
        text_config_from_vlm_hf({"text_config": {**settings, "model_type": "llava_onevision"}})


def test_placeholder_count_mismatch_is_explained(pair):
    images = _visual([[1, 4, 4]], seed=8)
    ids = _document([4, (IMAGE, 3), 3], seed=9)[None]  # 4 features, 3 placeholders
    with pytest.raises(ValueError, match="placeholder tokens"):
        pair.model(ids, images=images)
