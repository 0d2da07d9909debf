"""Whole vision-language model mappings (Qwen2.5-VL, LLaVA-OneVision, InternVL): tiny
transformers checkpoints round-trip bit for bit, every published layout imports to the same
forge tensors, the forge names are the forge VLM's, and other models' checkpoints fail clearly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from forge_ckpt import (
    CheckpointMismatchError,
    HFCheckpoint,
    get_mapping,
    load_hf_as_forge,
    mapping_for_hf_config,
    save_forge_as_hf,
)
from forge_ckpt.cli import main
from forge_ckpt.mapping.composed import ComposedMapping, Part, sub_config
from forge_ckpt.mapping.families import qwen2, qwen2_5_vl_vision

_TEXT = {
    "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1,
}  # fmt: skip
_QWEN_VISION = {
    "depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2,
    "out_hidden_size": 32, "fullatt_block_indexes": [1], "window_size": 16, "patch_size": 2,
    "spatial_merge_size": 2,
}  # fmt: skip
_SIGLIP = {
    "model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 48,
    "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 28, "patch_size": 14,
    "vision_use_head": False,
}  # fmt: skip
_INTERN_VIT = {
    "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
    "num_attention_heads": 2, "image_size": [28, 28], "patch_size": [14, 14],
}  # fmt: skip


def _save_qwen2_5_vl(out) -> None:
    import transformers

    mrope = {"type": "mrope", "mrope_section": [2, 3, 3]}
    config = transformers.Qwen2_5_VLConfig(
        text_config={**_TEXT, "rope_scaling": mrope},  # untied output head
        vision_config=_QWEN_VISION,
        image_token_id=90,
        video_token_id=91,
        vision_start_token_id=92,
        vision_end_token_id=93,
    )
    transformers.Qwen2_5_VLForConditionalGeneration(config).save_pretrained(out)


def _save_llava_onevision(out) -> None:
    import transformers

    config = transformers.LlavaOnevisionConfig(
        # tied through text_config (as LLaVA-OneVision 0.5B): transformers 5.23 ties the root
        text_config={**_TEXT, "model_type": "qwen2", "tie_word_embeddings": True},
        vision_config=_SIGLIP,
        image_token_index=90,
        video_token_index=91,
        image_grid_pinpoints=[[28, 28], [28, 56]],
    )
    transformers.LlavaOnevisionForConditionalGeneration(config).save_pretrained(out)


def _save_internvl(out) -> None:
    import transformers

    config = transformers.InternVLConfig(
        text_config={**_TEXT, "model_type": "qwen2"},  # root tie_word_embeddings: True (default)
        vision_config=_INTERN_VIT,
        image_token_id=90,
    )
    transformers.InternVLForConditionalGeneration(config).save_pretrained(out)


_SAVERS = {
    "qwen2_5_vl": _save_qwen2_5_vl,
    "llava_onevision": _save_llava_onevision,
    "internvl": _save_internvl,
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    torch.manual_seed(0)
    dirs = {}
    for family, save in _SAVERS.items():
        dirs[family] = tmp_path_factory.mktemp(family)
        save(dirs[family])
    return dirs


def _import(spec, folder, **options):
    ckpt = HFCheckpoint(folder)
    ctx = spec.context(ckpt.config, **{**spec.detect_context(ckpt.names()), **options})
    spec.check_hf({n: i.shape for n, i in ckpt.tensor_info().items()}, ctx)
    return dict(spec.hf_to_forge(ckpt.iter_tensors(), ctx)), ctx


def _forge_vlm_shapes(family: str, config: dict) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of the forge VLM for ``config.json`` (its three parts on meta)."""
    pytest.importorskip("forge_models")
    from forge_models.causal_lm import CausalLM
    from forge_models.vlm.hf_text import text_config_from_vlm_hf

    vision_hf = config["vision_config"]
    if family == "qwen2_5_vl":
        from forge_models.vision import qwen2_5_merger as merger
        from forge_models.vision import qwen2_5_vit as vit

        vision = vit.Qwen2_5VisionEncoder(vit.qwen2_5_vision_config_from_hf(vision_hf))
        projector = merger.Qwen2_5VLPatchMerger(merger.qwen2_5_merger_config_from_hf(vision_hf))
    elif family == "llava_onevision":
        from forge_models.vision import llava_onevision_projector as proj
        from forge_models.vision import siglip

        layer = config["vision_feature_layer"]
        vision = siglip.SiglipVisionEncoder(siglip.siglip_config_from_hf(vision_hf, feature_layer=layer))  # fmt: skip
        projector = proj.LlavaOnevisionProjector(proj.llava_onevision_projector_config_from_hf(config))  # fmt: skip
    else:
        from forge_models.vision import intern_vit
        from forge_models.vision import pixel_shuffle_projector as proj

        vision_config = intern_vit.intern_vit_config_from_hf(
            vision_hf, vision_feature_layer=config["vision_feature_layer"]
        )
        vision = intern_vit.InternVisionEncoder(vision_config)
        projector = proj.PixelShuffleProjector(proj.pixel_shuffle_projector_config_from_hf(config))
    # The output head is tied as the mapping's text view says (transformers 5.23's rule).
    tied = get_mapping(family).parts[1].config(config)["tie_word_embeddings"]
    with torch.device("meta"):
        parts = {
            "vision": vision.to("meta"),
            "projector": projector.to("meta"),
            "language_model": CausalLM(text_config_from_vlm_hf(config, tie_word_embeddings=tied)),
        }
    return {f"{p}.{k}": tuple(t.shape) for p, m in parts.items() for k, t in m.state_dict().items()}


# --------------------------------------------------------------------------------------------
# Round trips and names
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(_SAVERS))
def test_transformers_checkpoint_round_trips_bit_exact(checkpoints, family):
    spec = get_mapping(family)
    assert isinstance(spec, ComposedMapping)
    assert mapping_for_hf_config({"model_type": family}) is spec
    folder = checkpoints[family]
    forge, ctx = _import(spec, folder)
    assert ctx["hf_layout"] == "transformers"
    assert sorted(forge) == sorted(spec.forge_names(ctx))
    tied = family != "qwen2_5_vl"
    assert ("language_model.lm_head.weight" in forge) != tied
    assert {n.split(".")[0] for n in forge} == {"vision", "projector", "language_model"}
    back = dict(spec.forge_to_hf(forge.items(), ctx))
    saved = load_file(folder / "model.safetensors")
    assert set(back) == set(saved)  # every tensor (LLaVA's unapplied post_layernorm too)
    for name, tensor in back.items():
        assert tensor.dtype == saved[name].dtype, name
        assert torch.equal(tensor, saved[name]), name


@pytest.mark.parametrize("family", list(_SAVERS))
def test_forge_names_are_the_forge_vlm_names(checkpoints, family):
    spec = get_mapping(family)
    ckpt = HFCheckpoint(checkpoints[family])
    expected = _forge_vlm_shapes(family, ckpt.config)
    ctx = spec.context(ckpt.config, **spec.detect_context(ckpt.names()))
    assert sorted(spec.forge_names(ctx)) == sorted(expected)
    # Every mapped tensor has the shape the forge model expects.
    spec.check_hf({n: i.shape for n, i in ckpt.tensor_info().items()}, ctx, expected)


def _renamed(folder, out, rename) -> dict[str, torch.Tensor]:
    tensors = {rename(n): t for n, t in load_file(folder / "model.safetensors").items()}
    out.mkdir()
    (out / "config.json").write_text((folder / "config.json").read_text())
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return tensors


def _module_paths(name: str) -> str:
    """transformers' module path of a checkpoint name (``model.state_dict()`` names)."""
    for old, new in (
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("model.", "model.language_model."),
        ("visual.", "model.visual."),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
        ("image_newline", "model.image_newline"),
    ):
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def _hub_llava(name: str) -> str:
    """The llava-hf uploads keep SigLIP's ``vision_model.`` level."""
    head = "vision_tower."
    return f"{head}vision_model.{name[len(head) :]}" if name.startswith(head) else name


_LAYOUTS = [
    ("qwen2_5_vl", "modules", _module_paths),
    ("llava_onevision", "modules", _module_paths),
    ("llava_onevision", "transformers", _hub_llava),
    ("internvl", "modules", _module_paths),
]


@pytest.mark.parametrize(("family", "layout", "rename"), _LAYOUTS)
def test_other_layouts_import_to_the_same_tensors(checkpoints, tmp_path, family, layout, rename):
    spec = get_mapping(family)
    reference, default_ctx = _import(spec, checkpoints[family])
    renamed = _renamed(checkpoints[family], tmp_path / "renamed", rename)
    forge, ctx = _import(spec, tmp_path / "renamed")
    assert ctx["hf_layout"] == layout
    assert forge.keys() == reference.keys()
    assert all(torch.equal(forge[n], reference[n]) for n in forge)
    # Export keeps the detected layout; a context without detection writes transformers'.
    back = dict(spec.forge_to_hf(forge.items(), ctx))
    assert all(torch.equal(back[n], renamed[n]) for n in back)
    assert set(back) == set(renamed)
    plain = dict(spec.forge_to_hf(forge.items(), default_ctx))
    assert set(plain) == set(spec.hf_names(spec.context(HFCheckpoint(tmp_path / "renamed").config)))
    assert set(plain) == set(load_file(checkpoints[family] / "model.safetensors"))


# --------------------------------------------------------------------------------------------
# Checkpoints of other models
# --------------------------------------------------------------------------------------------


def test_text_only_checkpoint_fails_clearly(checkpoints, tmp_path):
    import transformers

    spec = get_mapping("qwen2_5_vl")
    out = tmp_path / "qwen2"
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_TEXT)).save_pretrained(out)
    ckpt = HFCheckpoint(out)
    with pytest.raises(CheckpointMismatchError, match="has no 'vision_config'"):
        spec.context(ckpt.config)
    with pytest.raises(CheckpointMismatchError, match="has no 'vision_config'"):
        load_hf_as_forge(out, mapping="qwen2_5_vl")
    # With the VLM's config, the missing tower is listed by its full checkpoint names.
    vlm_ctx = spec.context(HFCheckpoint(checkpoints["qwen2_5_vl"]).config)
    with pytest.raises(CheckpointMismatchError) as err:
        spec.check_hf({n: i.shape for n, i in ckpt.tensor_info().items()}, vlm_ctx)
    assert "visual.blocks.0.attn.qkv.weight" in err.value.missing
    assert "visual.merger.mlp.0.weight" in err.value.missing
    assert not [n for n in err.value.missing if n.startswith("model.")]


def test_missing_extra_and_misshaped_vision_tensors_are_named(checkpoints):
    spec = get_mapping("qwen2_5_vl")
    ckpt = HFCheckpoint(checkpoints["qwen2_5_vl"])
    ctx = spec.context(ckpt.config)
    shapes = {n: tuple(i.shape) for n, i in ckpt.tensor_info().items()}
    no_layer = {n: s for n, s in shapes.items() if not n.startswith("visual.blocks.1.")}
    with pytest.raises(CheckpointMismatchError) as err:
        spec.check_hf(no_layer, ctx)
    assert "visual.blocks.1.attn.qkv.weight" in err.value.missing
    assert len(err.value.missing) == len(shapes) - len(no_layer)
    # Streaming import names the missing tensors too.
    tensors = ((n, t) for n, t in ckpt.iter_tensors() if n in no_layer)
    with pytest.raises(CheckpointMismatchError, match=r"visual\.blocks\.1\.norm1\.weight"):
        dict(spec.hf_to_forge(tensors, ctx))
    extra = {**shapes, "visual.blocks.2.norm1.weight": (32,)}
    with pytest.raises(CheckpointMismatchError, match="vision part: it has checkpoint layer"):
        spec.check_hf(extra, ctx)
    bad = {**shapes, "visual.blocks.0.mlp.up_proj.weight": (40, 32)}
    with pytest.raises(CheckpointMismatchError, match=r"visual\.blocks\.0\.mlp\.up_proj\.weight"):
        spec.check_hf(bad, ctx)
    # Names of another layout under the default context: the error says which layout fits.
    modules = {_module_paths(n): s for n, s in shapes.items()}
    with pytest.raises(CheckpointMismatchError, match="fit the 'modules' layout"):
        spec.check_hf(modules, ctx)


# --------------------------------------------------------------------------------------------
# Everywhere a MappingSpec goes: convert, the CLI, options
# --------------------------------------------------------------------------------------------


def test_convert_and_cli_round_trip_keep_the_layout(checkpoints, tmp_path, capsys):
    src = tmp_path / "hub"
    source = _renamed(checkpoints["llava_onevision"], src, _hub_llava)
    forge, config = load_hf_as_forge(src)
    out = save_forge_as_hf(forge, tmp_path / "plain", config=config)
    assert set(load_file(out / "model.safetensors")) == set(load_file(checkpoints["llava_onevision"] / "model.safetensors"))  # fmt: skip
    fdir, back = tmp_path / "forge", tmp_path / "back"
    assert main(["hf-to-forge", str(src), str(fdir), "--quiet"]) == 0
    meta = json.loads((fdir / "forge_mapping.json").read_text())
    assert meta["options"]["vision.vision_model_prefix"] is True
    assert main(["forge-to-hf", str(fdir), str(back), "--quiet"]) == 0
    again = load_file(back / "model.safetensors")
    assert set(again) == set(source)
    assert all(torch.equal(again[n], source[n]) for n in again)
    capsys.readouterr()
    assert main(["hf-to-forge", str(src), str(fdir), "--check"]) == 0
    assert main(["forge-to-hf", str(fdir), str(back), "--check"]) == 0
    assert capsys.readouterr().out.count("check passed") == 2
    assert main(["hf-to-forge", str(src), str(fdir), "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert "vision_tower.vision_model.encoder.layers.1.self_attn.q_proj.weight [32, 32] -> vision.blocks.1.attn.q_proj.weight [32, 32]" in dry  # fmt: skip
    assert "language_model.model.embed_tokens.weight [96, 32] -> language_model.embed_tokens.weight [96, 32]  [pad(dim=0" in dry  # fmt: skip


def test_options_route_to_parts_and_describe(checkpoints):
    spec = get_mapping("internvl")
    config = HFCheckpoint(checkpoints["internvl"]).config
    ctx = spec.context(config, vocab_pad_multiple=64, **{"vision.feature_layer": 1})
    assert ctx["parts"]["text"]["vocab_pad_multiple"] == 64
    assert ctx["parts"]["vision"]["num_layers"] == 1  # layers after feature_layer not built
    assert ctx["mappings"] == {"vision": "intern_vit_vision", "text": "qwen2"}
    names = spec.forge_names(ctx)
    assert "vision.blocks.0.ls1" in names
    assert "vision.blocks.1.ls1" not in names
    text = spec.describe(ctx)
    assert "part text: mapping qwen2" in text
    assert "language_model.embed_tokens.weight <- language_model.model.embed_tokens.weight  [pad" in text  # fmt: skip
    with pytest.raises(ValueError, match="no part"):
        spec.context(config, **{"audio.x": 1})
    with pytest.raises(ValueError, match="no checkpoint layout 'megatron'"):
        spec.context(config, hf_layout="megatron")
    with pytest.raises(CheckpointMismatchError, match="model_type 'gpt2'"):
        spec.context({**config, "text_config": {**config["text_config"], "model_type": "gpt2"}})
    with pytest.raises(ValueError, match="not a composed mapping's"):
        spec.bind({"hf_layout": "transformers"})


def test_composed_mapping_validation():
    def text(name: str, hf_prefix: str) -> Part:
        return Part(
            name=name,
            spec=qwen2.MAPPING,
            config=sub_config(None),
            forge_prefix="",
            hf_prefix={"a": hf_prefix},
        )

    vision = Part(
        name="vision",
        spec=qwen2_5_vl_vision.MAPPING,
        config=sub_config("vision_config"),
        forge_prefix="",
        hf_prefix={"a": "visual."},
    )
    with pytest.raises(ValueError, match="layouts"):
        ComposedMapping(name="x", hf_model_types=("x",), parts=(vision,), layouts={"b": ""})
    with pytest.raises(ValueError, match="without dots"):
        text("a.b", "")
    with pytest.raises(ValueError, match="repeat"):
        ComposedMapping(name="x", hf_model_types=("x",), parts=(vision, vision), layouts={"a": ""})
    # Two parts under one forge prefix: the clash is named when bound.
    clash = ComposedMapping(
        name="x",
        hf_model_types=("x",),
        parts=(text("t1", "x."), text("t2", "y.")),
        layouts={"a": ""},
    )
    ctx = clash.context({"num_hidden_layers": 1, "vocab_size": 8})
    with pytest.raises(ValueError, match="two parts map the same forge names"):
        clash.bind(ctx)
