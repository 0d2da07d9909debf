"""VLMs that take image features from an inner vision layer (``vision_feature_layer=-2``, the
LLaVA default) keep every checkpoint tensor: tiny LLaVA-OneVision and InternVL checkpoints saved
by transformers load through ``forge_models.from_pretrained`` with the blocks after the feature
layer (and InternViT's final layernorm) carried as buffers, never run; forge's logits and
gradients equal transformers'; ``save_pretrained`` writes the source folder back tensor for
tensor (names, dtypes, bits), and transformers loads that export with nothing missing or
unexpected and gives forge's logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import forge_models
from forge_core.testing import import_path
from forge_kernels.registry import reference_implementations
from forge_models.vision.unapplied_blocks import UnappliedBlocks
from forge_models.vision.vit_blocks import UnappliedLayerNorm
from forge_models.vlm import VisualInputs

ph = import_path(Path(__file__).parent.with_name("parity_helpers.py"), "forge_models_tests_ph_vfl")

IMAGE, VIDEO, VOCAB = 90, 91, 100
TEXT = {
    "model_type": "qwen2", "hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 1,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB,
}  # fmt: skip
CASES = {
    "llava_onevision": (
        "LlavaOnevisionConfig",
        "LlavaOnevisionForConditionalGeneration",
        {
            "vision_config": {
                "model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 48,
                "num_hidden_layers": 3, "num_attention_heads": 2, "image_size": 21,
                "patch_size": 7, "vision_use_head": False,
            },
            "vision_feature_layer": -2, "text_config": TEXT, "image_token_id": IMAGE,
            "video_token_id": VIDEO, "image_grid_pinpoints": [[21, 21], [21, 42]],
        },
        # the tower's last block and post_layernorm: loaded by transformers, never applied
        ("model.vision_tower.encoder.layers.2.", "model.vision_tower.post_layernorm."),
    ),
    "internvl": (
        "InternVLConfig",
        "InternVLForConditionalGeneration",
        {
            "vision_config": {
                "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
                "intermediate_size": 64, "image_size": 32, "patch_size": 8,
                "use_mean_pooling": False,  # a final layernorm, unapplied with -2
            },
            "vision_feature_layer": -2, "text_config": TEXT, "image_token_id": IMAGE,
            "downsample_ratio": 0.5,
        },
        ("model.vision_tower.encoder.layer.2.", "model.vision_tower.layernorm."),
    ),
}  # fmt: skip


@pytest.fixture(autouse=True)
def _eager_kernels():
    with reference_implementations():
        yield


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _inputs(family: str, model) -> tuple[torch.Tensor, VisualInputs, dict]:
    """One document with one image: ids, forge's visual inputs, transformers' kwargs."""
    gen = torch.Generator().manual_seed(3)
    if family == "internvl":
        pixels = torch.randn(2, 3, 32, 32, generator=gen)
        visual = VisualInputs(pixel_values=pixels, tiles_per_item=torch.tensor([2]))
        kwargs = {"pixel_values": pixels}
    else:  # AnyRes: a base tile and a 1x2 crop grid
        pixels, sizes = torch.randn(3, 3, 21, 21, generator=gen), torch.tensor([[18, 40]])
        visual = VisualInputs(
            pixel_values=pixels, tiles_per_item=torch.tensor([3]), image_sizes=sizes
        )
        kwargs = {"pixel_values": pixels[None], "image_sizes": sizes}
    n = 8 if model is None else model.num_visual_tokens(visual)[0]  # InternVL: 2 tiles x 4
    text = torch.randint(1, 80, (7,), generator=gen)
    ids = torch.cat([text[:3], torch.full((n,), IMAGE), text[3:]])
    return ids, visual, kwargs


@pytest.mark.parametrize("family", list(CASES))
def test_inner_feature_layer_round_trips_and_matches_transformers(tmp_path, family):
    config_cls, model_cls, config, unapplied_prefixes = CASES[family]
    pair = ph.HFPair(config_cls, model_cls, config, tmp_path / "source")
    model = pair.model
    vision = model.vision
    # Two blocks run (hidden_states[-2] of three), the third carried; InternViT's final
    # layernorm and SigLIP's post_layernorm carried too: buffers, not parameters.
    assert (len(vision.blocks), len(vision.unapplied_blocks)) == (2, 1)
    assert isinstance(vision.unapplied_blocks, UnappliedBlocks)
    norm = vision.post_norm if family == "internvl" else vision.post_layernorm
    assert isinstance(norm, UnappliedLayerNorm)
    assert not [n for n, _ in vision.named_parameters() if "unapplied" in n or "post_" in n]
    with pytest.raises(RuntimeError, match="only carries checkpoint values"):
        vision.unapplied_blocks(torch.zeros(1, 32))

    # Forge's logits and every gradient equal transformers' on the source checkpoint; the
    # carried tensors got no gradient there and hold its values.
    ids, visual, ref_kwargs = _inputs(family, model)
    probe = ph.probe(VOCAB, (1, len(ids)), seed=5)
    pair.zero_grad()
    logits = model(ids[None], images=visual)
    (logits * probe).sum().backward()
    ref_logits = pair.ref(input_ids=ids[None], **ref_kwargs).logits
    (ref_logits * probe).sum().backward()
    assert ph.rel(logits, ref_logits) <= ph.RTOL
    unused = tuple(n for n, _ in pair.ref.named_parameters() if n.startswith(unapplied_prefixes))
    assert len(unused) > 2
    pair.assert_grads_match(hf_layout="modules", unused=unused)

    # HF -> forge -> HF: the source folder back, tensor for tensor.
    out = forge_models.save_pretrained(model, tmp_path / "export")
    source, back = _tensors(pair.hf_dir), _tensors(out)
    assert sorted(back) == sorted(source)
    for name, tensor in source.items():
        assert back[name].dtype == tensor.dtype, name
        assert torch.equal(back[name], tensor), name

    # transformers loads the export with every tensor and gives forge's logits; so too for a
    # model forge built from scratch (its carried blocks initialized as the others).
    torch.manual_seed(1)
    fresh = forge_models.build_model(model.config)
    carried = fresh.vision.unapplied_blocks[0]
    assert all(torch.isfinite(t).all() for t in carried.state_dict().values())
    assert carried.mlp.fc1.weight.std() > 0
    for name, forge_model in (("loaded", model), ("fresh", fresh)):
        out = forge_models.save_pretrained(forge_model, tmp_path / f"export-{name}")
        reloaded, info = pair.ref_cls.from_pretrained(out, output_loading_info=True)
        assert not any(info.values()), (name, info)
        with torch.no_grad():
            ours = forge_model(ids[None], images=visual)
            theirs = reloaded.eval()(input_ids=ids[None], **ref_kwargs).logits
        assert ph.rel(ours, theirs) <= ph.RTOL, name


def test_training_checkpoint_resumes_with_the_carried_blocks(tmp_path):
    """A forge training checkpoint (DCP, one process) of a model with carried blocks: they are
    saved as buffers, not optimizer state, and a fresh model resumes to the saved state and the
    next step's loss."""
    from forge_ckpt import CheckpointConfig, CheckpointManager

    _, _, hf, _ = CASES["internvl"]
    config = forge_models.get_family("internvl").config_from_hf(hf)
    ids, visual, _ = _inputs("internvl", None)

    def build(seed: int):
        torch.manual_seed(seed)
        model = forge_models.build_model(config)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    def step(model, optimizer) -> float:
        optimizer.zero_grad()
        loss = (model(ids[None], images=visual) * ph.probe(VOCAB, (1, len(ids)))).mean()
        loss.backward()
        optimizer.step()
        return loss.item()

    model, optimizer = build(0)
    step(model, optimizer)
    param_ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(id(b) not in param_ids for b in model.vision.unapplied_blocks.buffers())
    manager = CheckpointManager(CheckpointConfig(directory=tmp_path / "ckpt"))
    manager.save(1, model=model, optimizer=optimizer)
    saved = {n: t.clone() for n, t in model.state_dict().items()}
    want = step(model, optimizer)

    other, other_optimizer = build(1)  # other values everywhere, carried blocks included
    name = "vision.unapplied_blocks.0.attn.q_proj.weight"
    assert not torch.equal(other.state_dict()[name], saved[name])
    manager.load(1, model=other, optimizer=other_optimizer)
    for n, t in other.state_dict().items():
        assert torch.equal(t, saved[n]), n
    assert step(other, other_optimizer) == want
