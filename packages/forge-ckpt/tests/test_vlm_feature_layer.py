"""LLaVA-OneVision and InternVL checkpoints whose image features come from an inner vision layer
(``vision_feature_layer=-2``): HF -> forge -> HF keeps every tensor (the blocks after the
feature layer and InternViT's unapplied final layernorm map to the encoder's carried
``unapplied_blocks`` / ``post_norm``), and the Megatron-Core ``LLaVAModel`` export, which has no
place for them, drops exactly those and round-trips the rest bit for bit."""

from __future__ import annotations

import pathlib

import pytest
import torch
from safetensors.torch import load_file

from forge_ckpt import HFCheckpoint, get_mapping
from forge_ckpt.megatron import hf_to_megatron, load_pt, megatron_to_hf

_TEXT = {
    "model_type": "qwen2", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48,
    "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
}  # fmt: skip
_SIGLIP = {
    "model_type": "siglip_vision_model", "hidden_size": 16, "intermediate_size": 24,
    "num_hidden_layers": 3, "num_attention_heads": 2, "image_size": 28, "patch_size": 14,
    "vision_use_head": False,
}  # fmt: skip
_INTERN_VIT = {
    "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 3, "num_attention_heads": 2,
    "image_size": [28, 28], "patch_size": [14, 14], "attention_bias": True,
    "use_mean_pooling": False,  # a final layernorm, which -2 leaves unapplied
}  # fmt: skip

#: Checkpoint names of what transformers loads but never applies with -2 (the last block of
#: three, the final norm), by family.
_UNAPPLIED = {
    "llava_onevision": ("vision_tower.encoder.layers.2.", "vision_tower.post_layernorm."),
    "internvl": ("vision_tower.encoder.layer.2.", "vision_tower.layernorm."),
}


def _save(family: str, out: pathlib.Path) -> pathlib.Path:
    import transformers

    torch.manual_seed(0)
    if family == "llava_onevision":
        config = transformers.LlavaOnevisionConfig(
            text_config={**_TEXT, "tie_word_embeddings": True}, vision_config=_SIGLIP,
            vision_feature_layer=-2, image_token_index=90, video_token_index=91,
            image_grid_pinpoints=[[28, 28]],
        )  # fmt: skip
        model = transformers.LlavaOnevisionForConditionalGeneration(config)
    else:
        config = transformers.InternVLConfig(
            text_config=_TEXT, vision_config=_INTERN_VIT, vision_feature_layer=-2,
            image_token_id=90,
        )  # fmt: skip
        model = transformers.InternVLForConditionalGeneration(config)
    with torch.no_grad():  # transformers initializes some of these to constants
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    return {f: _save(f, tmp_path_factory.mktemp(f)) for f in ("llava_onevision", "internvl")}


def _tensors(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _assert_same(back: dict, original: dict) -> None:
    assert sorted(back) == sorted(original)
    for name, t in original.items():
        assert back[name].dtype == t.dtype, name
        assert torch.equal(back[name], t), name


@pytest.mark.parametrize("family", list(_UNAPPLIED))
def test_forge_round_trip_carries_the_unapplied_vision_tensors(hf_dirs, family):
    spec, ckpt = get_mapping(family), HFCheckpoint(hf_dirs[family])
    ctx = spec.context(ckpt.config, **spec.detect_context(ckpt.names()))
    vision = ctx["parts"]["vision"]
    assert (vision["num_layers"], vision["num_hf_layers"]) == (2, 3)
    assert not vision["ignored_hf_layers"]
    forge = dict(spec.hf_to_forge(ckpt.iter_tensors(), ctx))
    carried = sorted(n for n in forge if "unapplied_blocks" in n)
    assert carried
    assert all(n.startswith("vision.unapplied_blocks.0.") for n in carried)
    post = "vision.post_norm.weight" if family == "internvl" else "vision.post_layernorm.weight"
    assert post in forge
    _assert_same(dict(spec.forge_to_hf(forge.items(), ctx)), _tensors(hf_dirs[family]))
    # Dropped on request (a target with no place for them), and named so in a dry run.
    drop = spec.context(
        ckpt.config, **spec.detect_context(ckpt.names()), **{"vision.carry_unapplied_layers": False}
    )
    assert drop["parts"]["vision"]["ignored_hf_layers"] == {2}
    assert "ignored: checkpoint layer 2 of part vision" in spec.describe(drop)
    assert not [n for n in spec.forge_names(drop) if "unapplied_blocks" in n]


@pytest.mark.parametrize("family", list(_UNAPPLIED))
def test_megatron_export_drops_only_what_it_cannot_hold(hf_dirs, tmp_path, family):
    """Megatron-Core's CLIPViTModel runs every layer it holds and outputs the last: it is built
    with the two layers the features need; the third (and InternViT's unapplied final norm,
    which CLIPViTModel(internvit) has no place for) are dropped, and everything else
    round-trips bit for bit. (SigLIP's post_layernorm is CLIPViTModel's ln_post: kept.)"""
    mc = hf_to_megatron(hf_dirs[family], tmp_path / "mc", format="legacy")
    root = mc / "iter_0000000" / "mp_rank_00"
    checkpoint = load_pt(root / "model_optim_rng.pt")
    state = checkpoint["model"]
    layers = {n.split(".")[3] for n in state if n.startswith("vision_model.decoder.layers.")}
    assert layers == {"0", "1"}
    assert vars(checkpoint["args"])["vision_num_layers"] == 2
    assert not [n for n in state if "unbuilt" in n or "unapplied" in n]
    assert ("vision_model.ln_post.weight" in state) == (family == "llava_onevision")
    dropped = _UNAPPLIED[family] if family == "internvl" else _UNAPPLIED[family][:1]
    source = _tensors(hf_dirs[family])
    kept = {n: t for n, t in source.items() if not n.startswith(dropped)}
    assert len(kept) < len(source)
    _assert_same(_tensors(megatron_to_hf(mc, tmp_path / "back")), kept)
