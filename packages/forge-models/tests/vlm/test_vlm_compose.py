"""A VLM none of the references has (SigLIP + InternVL's pixel-shuffle projector + a Llama
decoder, bidirectional attention inside each image), built from YAML alone, trains: the loss
falls, frozen parts stay bit-identical, unfrozen parts move; bad configs fail clearly."""

from __future__ import annotations

import pytest
import torch
import yaml

from forge_kernels.registry import reference_implementations
from forge_models.vlm import VisualInputs, build_vlm, vlm_config_from_dict

YAML = """
vision: {name: siglip, hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64,
         image_size: 28, patch_size: 7}
projector: {name: pixel_shuffle_mlp}
text: {size: llama-debug, num_layers: 2, vocab_size: 128}
image_token_id: 7
image_attention: bidirectional
frozen: [vision]
"""
IMAGE = 7


@pytest.fixture(autouse=True)
def _eager_kernels():
    with reference_implementations():
        yield


def _batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    tiles = torch.tensor([1, 2])
    visual = VisualInputs(
        pixel_values=torch.randn(3, 3, 28, 28, generator=gen), tiles_per_item=tiles
    )
    caption = torch.randint(10, 128, (12,), generator=gen)
    ids = torch.cat([torch.full((4,), IMAGE), caption[:6], torch.full((8,), IMAGE), caption[6:]])
    labels = ids.masked_fill(ids == IMAGE, -100)
    return ids[None], labels[None], visual


def test_yaml_combination_trains_with_frozen_encoder():
    torch.manual_seed(0)
    model = build_vlm(yaml.safe_load(YAML))
    assert type(model.vision).__name__ == "SiglipVisionEncoder"
    assert model.config.projector.vision_hidden_size == 32  # wired from the encoder
    assert model.config.projector.text_hidden_size == model.config.text.hidden_size
    assert model.trainable_parts() == ["projector", "language_model"]
    vision_before = {n: p.clone() for n, p in model.vision.named_parameters()}
    projector_before = {n: p.clone() for n, p in model.projector.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=3e-3)
    ids, labels, visual = _batch(0)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=labels, images=visual)
        loss.backward()
        optim.step()
        optim.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    for name, p in model.vision.named_parameters():
        assert torch.equal(p, vision_before[name]), name
        assert p.grad is None, name
    assert any(
        not torch.equal(p, projector_before[n]) for n, p in model.projector.named_parameters()
    )
    model.set_trainable(vision=True)
    assert model.trainable_parts() == ["vision", "projector", "language_model"]


def test_bidirectional_image_blocks_change_only_image_tokens():
    torch.manual_seed(0)
    settings = yaml.safe_load(YAML)
    settings["text"]["num_layers"] = 1  # one layer: only the mask differs between the two
    bidirectional = build_vlm(settings).eval()
    causal = build_vlm({**settings, "image_attention": "causal"}).eval()
    causal.load_state_dict(bidirectional.state_dict())
    ids, _, visual = _batch(1)
    with torch.no_grad():
        a, b = bidirectional(ids, images=visual), causal(ids, images=visual)
    # the first image's first token sees its whole image only with bidirectional blocks
    assert not torch.allclose(a[0, 0], b[0, 0])
    # the last image token sees everything before it either way (no later image token)
    torch.testing.assert_close(a[0, 17], b[0, 17], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"vision": {"name": "no_such_vit"}}, "unknown vision 'no_such_vit'"),
        ({"projector": {"name": "pixel_shuffle_mlp", "bogus": 1}}, "unknown projector setting"),
        ({"image_token_id": 1000}, "outside the language model's vocabulary"),
        ({"frozen": ["decoder"]}, "frozen: unknown component"),
    ],
)
def test_bad_configs_say_what_is_wrong(change, message):
    with pytest.raises(ValueError, match=message):
        vlm_config_from_dict({**yaml.safe_load(YAML), **change})


def test_module_docstring_example_builds():
    import forge_models.vlm.config as module

    example = module.__doc__.split("::", 1)[1].split("\n\n(", 1)[0]
    model = build_vlm(yaml.safe_load(example), device="meta")
    assert model.config.projector_name == "pixel_shuffle_mlp"
    assert model.config.projector.vision_hidden_size == 64  # wired from the encoder
    assert model.config.projector.patch_size == 14


@pytest.mark.parametrize(
    ("part", "change", "message"),
    [
        ("projector", {"patch_size": 14}, r"projector.patch_size=14 but vision.patch_size=7"),
        ("projector", {"vision_hidden_size": 48}, r"vision_hidden_size=48 but vision.hidden_size"),
        ("vision", {"intermediate_size": None}, r"vision 'siglip' .* needs \['intermediate_size'"),
    ],
)
def test_projector_disagreeing_with_its_neighbours_or_missing_fields_fail(part, change, message):
    settings = yaml.safe_load(YAML)
    settings[part] = {**settings[part], **change}
    settings[part] = {k: v for k, v in settings[part].items() if v is not None}
    with pytest.raises(ValueError, match=message):
        vlm_config_from_dict(settings)


def test_sequence_index_runs_the_language_model_on_a_shard():
    """``sequence_index`` (context parallelism): features placed on the whole row, the
    language model run on some of its positions. A causal prefix cut in the middle of the
    second image gives the same per-token losses as the whole row's prefix; the features of
    the placeholders there flow back to the encoder."""
    from forge_models.causal_lm import IGNORE_INDEX, shift_labels

    torch.manual_seed(0)
    model = build_vlm({**yaml.safe_load(YAML), "image_attention": "causal", "frozen": []})
    ids, labels, visual = _batch(1)
    targets = shift_labels(labels)
    whole = model(ids, labels=labels, images=visual, loss_reduction="sum")
    logits = model(ids, images=visual)
    cut = 14  # the 4 + 6 first tokens, then 4 of the second image's 8 placeholders
    index = torch.arange(cut)
    shard = model(ids, images=visual, sequence_index=index, targets=targets[:, :cut],
                  loss_reduction="sum")  # fmt: skip
    per_token = torch.nn.functional.cross_entropy(
        logits[0, :cut], targets[0, :cut], ignore_index=IGNORE_INDEX, reduction="sum"
    )
    torch.testing.assert_close(shard, per_token, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(shard, whole)
    shard.backward()
    grads = [p.grad for p in model.vision.parameters()]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    with pytest.raises(ValueError, match="targets"):
        model(ids, images=visual, sequence_index=index, labels=labels)
    # Bidirectional images: the shard runs causal; the whole row's blocks are for the
    # context-parallel attention (forge-train's CP test checks the numerics), not the model.
    bidirectional = build_vlm(yaml.safe_load(YAML))
    blocks = bidirectional.attention_block_ids(ids, images=visual)
    assert blocks.shape == ids.shape
    assert set(blocks.unique().tolist()) == {-1, 0, 1}
    assert model.attention_block_ids(ids, images=visual) is None  # causal images
    with pytest.raises(ValueError, match=r"give the whole row's block_ids .* to the context"):
        bidirectional(ids, images=visual, sequence_index=index, targets=targets[:, :cut],
                      block_ids=blocks)  # fmt: skip


def test_qwen2_5_vl_merger_with_another_merge_size_than_the_encoder_fails():
    """The encoder orders its patches in 2 x 2 merge units; a merger folding 4 x 4 would run and
    mix patches of different units (it used to build silently)."""
    settings = {
        "vision": {
            "name": "qwen2_5_vit", "depth": 1, "hidden_size": 32, "intermediate_size": 48,
            "num_heads": 2, "patch_size": 2, "temporal_patch_size": 2, "spatial_merge_size": 2,
            "window_size": 8, "fullatt_block_indexes": [0],
        },
        "projector": {"name": "qwen2_5_vl_merger", "spatial_merge_size": 4},
        "text": {"size": "qwen2-debug", "vocab_size": 100, "mrope_section": [2, 3, 3]},
        "image_token_id": 90, "video_token_id": 91, "vision_start_token_id": 92,
    }  # fmt: skip
    with pytest.raises(ValueError, match=r"spatial_merge_size=4 but vision.spatial_merge_size=2"):
        vlm_config_from_dict(settings)
    settings["projector"]["spatial_merge_size"] = 2  # the same value is fine
    assert vlm_config_from_dict(settings).projector.spatial_merge_size == 2
