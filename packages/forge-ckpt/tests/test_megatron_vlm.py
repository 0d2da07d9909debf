"""Vision-language families <-> Megatron-Core ``LLaVAModel``: tiny transformers LLaVA-OneVision
and InternVL checkpoints round-trip HF -> Megatron -> HF bit for bit at 1x1, TP2 and TP2 x PP2 in
both formats; the layout (names, splits, stage placement, per-head QKV) is checked against
Megatron-LM's converters computed by hand; the CLI converts a VLM folder both ways; Qwen2.5-VL
and what the LLaVAModel cannot hold are refused with clear errors."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from forge_ckpt.cli import main
from forge_ckpt.megatron import get_megatron_family, hf_to_megatron, load_pt, megatron_to_hf

# Two KV heads so that TP2 splits whole query groups, as Megatron-Core requires.
_TEXT = {
    "model_type": "qwen2", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
}  # fmt: skip
_SIGLIP = {
    "model_type": "siglip_vision_model", "hidden_size": 16, "intermediate_size": 24,
    "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 28, "patch_size": 14,
    "vision_use_head": False,
}  # fmt: skip
_INTERN_VIT = {
    "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2,
    "image_size": [28, 28], "patch_size": [14, 14], "attention_bias": True,
}  # fmt: skip


def _save(kind: str, out: pathlib.Path) -> pathlib.Path:
    import transformers

    torch.manual_seed(0)
    if kind == "llava_onevision":
        config = transformers.LlavaOnevisionConfig(
            text_config={**_TEXT, "tie_word_embeddings": True}, vision_config=_SIGLIP,
            image_token_index=90, video_token_index=91, image_grid_pinpoints=[[28, 28]],
        )  # fmt: skip
        model = transformers.LlavaOnevisionForConditionalGeneration(config)
    else:
        config = transformers.InternVLConfig(
            text_config=_TEXT, vision_config=_INTERN_VIT, image_token_id=90
        )
        model = transformers.InternVLForConditionalGeneration(config)
    with torch.no_grad():  # transformers initializes some of these to constants
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    model.save_pretrained(out, max_shard_size="20KB")
    return out


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    return {k: _save(k, tmp_path_factory.mktemp(k)) for k in ("llava_onevision", "internvl")}


def _tensors(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _assert_same(back: dict, original: dict, tag: str) -> None:
    assert sorted(back) == sorted(original), tag
    for name, t in original.items():
        assert back[name].dtype == t.dtype, (tag, name)
        assert torch.equal(back[name], t), (tag, name)


# (tp, pp, Transformer Engine spec); InternVL's projector norm exists only in the TE spec.
SPLITS = {
    "llava_onevision": [(1, 1, True), (2, 1, True), (2, 2, True), (2, 2, False)],
    "internvl": [(1, 1, True), (2, 1, True), (2, 2, True)],
}


@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
@pytest.mark.parametrize("family", sorted(SPLITS))
def test_hf_megatron_hf_round_trip_is_bit_exact(hf_dirs, tmp_path, family, fmt):
    original = _tensors(hf_dirs[family])
    for tp, pp, te in SPLITS[family]:
        tag = f"{family}-{tp}x{pp}-{te}"
        mc = hf_to_megatron(
            hf_dirs[family], tmp_path / f"mc-{tag}", tensor_parallel=tp, pipeline_parallel=pp,
            format=fmt, te_spec=te,
        )  # fmt: skip
        back = megatron_to_hf(mc, tmp_path / f"hf-{tag}", max_shard_size="20KB")
        _assert_same(_tensors(back), original, tag)


def test_internvit_6b_style_tower_round_trips_at_tp2(hf_dirs, tmp_path):
    """InternViT-6B's variant (RMSNorm without biases, per-head q/k norms, no QKV bias): its q/k
    norms are split over TP ranks with the heads (Megatron-LM's InternViTRMSNorm)."""
    import transformers

    torch.manual_seed(0)
    vision = {**_INTERN_VIT, "norm_type": "rms_norm", "use_qk_norm": True, "attention_bias": False}
    config = transformers.InternVLConfig(text_config=_TEXT, vision_config=vision, image_token_id=90)
    model = transformers.InternVLForConditionalGeneration(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    src = tmp_path / "hf"
    model.save_pretrained(src)
    hf = _tensors(src)
    mc = hf_to_megatron(src, tmp_path / "mc", tensor_parallel=2, format="legacy")
    rank1 = _rank(mc, "mp_rank_01")
    q_norm = hf["vision_tower.encoder.layer.0.attention.q_norm.weight"]
    assert torch.equal(
        rank1["vision_model.decoder.layers.0.self_attention.q_layernorm.weight"], q_norm.chunk(2)[1]
    )
    assert "vision_model.decoder.layers.0.input_layernorm.bias" not in rank1
    _assert_same(_tensors(megatron_to_hf(mc, tmp_path / "back")), hf, "internvit-6b style")


def test_hub_tower_layout_comes_back_as_it_was(hf_dirs, tmp_path):
    """The llava-hf uploads keep SigLIP under ``vision_tower.vision_model.``; transformers 5
    saves it under ``vision_tower.``: the Megatron checkpoint records which, for the way back."""
    src = tmp_path / "hub"
    src.mkdir()
    (src / "config.json").write_text((hf_dirs["llava_onevision"] / "config.json").read_text())
    hub = {
        n.replace("vision_tower.", "vision_tower.vision_model.", 1): t
        for n, t in _tensors(hf_dirs["llava_onevision"]).items()
    }
    save_file(hub, src / "model.safetensors")
    mc = hf_to_megatron(src, tmp_path / "mc", tensor_parallel=2, format="legacy")
    _assert_same(_tensors(megatron_to_hf(mc, tmp_path / "back")), hub, "hub layout")


def _rank(root: pathlib.Path, name: str) -> dict[str, torch.Tensor]:
    return load_pt(root / "iter_0000000" / name / "model_optim_rng.pt")["model"]


def _by_head_qkv(q, k, v, heads):
    """Megatron-LM's siglip_converter order: [q_h; k_h; v_h] head by head."""
    d = q.shape[0] // heads
    return torch.cat(
        [q.view(heads, d, -1), k.view(heads, d, -1), v.view(heads, d, -1)], dim=1
    ).reshape(3 * heads * d, *q.shape[1:])


def test_llava_onevision_legacy_tp2_pp2_layout(hf_dirs, tmp_path):
    hf = _tensors(hf_dirs["llava_onevision"])
    root = hf_to_megatron(
        hf_dirs["llava_onevision"], tmp_path / "mc", tensor_parallel=2, pipeline_parallel=2,
        format="legacy",
    )  # fmt: skip
    first, last = _rank(root, "mp_rank_01_000"), _rank(root, "mp_rank_01_001")
    # The encoder and projector live on the first stage only; the language model's layers are
    # numbered per stage under language_model.; the tied head's copy sits on the last stage.
    assert {n.split(".")[0] for n in first} == {
        "vision_model",
        "vision_projection",
        "language_model",
    }
    assert not any(n.startswith("vision") for n in last)
    assert "language_model.decoder.layers.0.mlp.linear_fc2.weight" in last
    assert "language_model.decoder.layers.1.mlp.linear_fc2.weight" not in last
    assert torch.equal(
        last["language_model.output_layer.weight"],
        first["language_model.embedding.word_embeddings.weight"],
    )
    hub_layout = any(n.startswith("vision_tower.vision_model.") for n in hf)
    t = f"vision_tower.{'vision_model.' if hub_layout else ''}encoder.layers.1"
    v = "vision_model.decoder.layers.1"
    # Per-head QKV with biases, then TP rank 1's half of the heads (column-parallel).
    for kind in ("weight", "bias"):
        q, k, w = (hf[f"{t}.self_attn.{p}_proj.{kind}"] for p in "qkv")
        full = _by_head_qkv(q, k, w, heads=2)
        assert torch.equal(first[f"{v}.self_attention.linear_qkv.{kind}"], full.chunk(2)[1])
    # GELU MLP: linear_fc1 is plain column-parallel (not SwiGLU), linear_fc2 row-parallel.
    assert torch.equal(first[f"{v}.mlp.linear_fc1.weight"], hf[f"{t}.mlp.fc1.weight"].chunk(2)[1])
    assert torch.equal(
        first[f"{v}.mlp.linear_fc2.weight"], hf[f"{t}.mlp.fc2.weight"].chunk(2, 1)[1]
    )
    assert torch.equal(first[f"{v}.mlp.linear_fc2.bias"], hf[f"{t}.mlp.fc2.bias"])
    # TE spec: the layer norms fused into linear_qkv / linear_fc1.
    assert torch.equal(
        first[f"{v}.self_attention.linear_qkv.layer_norm_bias"], hf[f"{t}.layer_norm1.bias"]
    )
    assert torch.equal(
        first[f"{v}.mlp.linear_fc1.layer_norm_weight"], hf[f"{t}.layer_norm2.weight"]
    )
    p = "multi_modal_projector"
    assert torch.equal(
        first["vision_projection.encoder.linear_fc1.weight"], hf[f"{p}.linear_1.weight"].chunk(2)[1]
    )
    assert torch.equal(first["vision_projection.encoder.linear_fc2.bias"], hf[f"{p}.linear_2.bias"])
    assert torch.equal(first["vision_projection.image_newline"], hf["image_newline"])
    assert first["vision_model.ln_post.weight"].shape == (16,)
    args = vars(load_pt(root / "iter_0000000/mp_rank_00_000/model_optim_rng.pt")["args"])
    assert args["vision_model_type"] == "siglip"
    assert (args["num_layers"], args["vision_num_layers"]) == (2, 2)
    assert args["hf_model_type"] == "llava_onevision"


def test_internvl_layout(hf_dirs, tmp_path):
    hf = _tensors(hf_dirs["internvl"])
    root = hf_to_megatron(hf_dirs["internvl"], tmp_path / "mc", format="legacy")
    m = _rank(root, "mp_rank_00")
    t, v = "vision_tower.encoder.layer.0", "vision_model.decoder.layers.0"
    assert torch.equal(m["vision_model.class_token"], hf["vision_tower.embeddings.cls_token"])
    pos = hf["vision_tower.embeddings.position_embeddings"]
    assert torch.equal(m["vision_model.position_embeddings.weight"], pos[0])  # [1, n, h] -> [n, h]
    assert torch.equal(m[f"{v}.ls1"], hf[f"{t}.lambda_1"])
    assert torch.equal(m[f"{v}.input_layernorm.bias"], hf[f"{t}.layernorm_before.bias"])
    q, k, w = (hf[f"{t}.attention.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(m[f"{v}.self_attention.linear_qkv.weight"], _by_head_qkv(q, k, w, heads=2))
    f1 = "vision_projection.encoder.linear_fc1"
    assert torch.equal(m[f"{f1}.layer_norm_weight"], hf["multi_modal_projector.layer_norm.weight"])
    assert torch.equal(m[f"{f1}.weight"], hf["multi_modal_projector.linear_1.weight"])


def test_torch_dist_keys_stack_each_modules_layers(hf_dirs, tmp_path):
    from forge_ckpt.megatron.dist import DistCheckpoint

    root = hf_to_megatron(
        hf_dirs["llava_onevision"], tmp_path / "mc", tensor_parallel=2, pipeline_parallel=2,
        te_spec=False,
    )  # fmt: skip
    keys = DistCheckpoint(root).keys()
    # megatron-core 0.16's LLaVAModel.sharded_state_dict keys (local specs): each module stacks
    # its own layers; the local GPT spec renames its norms to TE's names, the ViT's does not.
    v, lm = "vision_model.decoder.layers.", "language_model.decoder.layers."
    assert keys[f"{v}self_attention.linear_qkv.weight"] == (2, 48, 16)
    assert keys[f"{v}input_layernorm.bias"] == (2, 16)
    assert keys[f"{v}mlp.linear_fc1.weight"] == (2, 24, 16)
    assert keys[f"{lm}self_attention.linear_qkv.layer_norm_weight"] == (2, 32)
    assert keys[f"{lm}mlp.linear_fc1.weight"] == (2, 96, 32)
    assert keys["vision_model.conv1.weight"] == (16, 3, 14, 14)
    assert keys["vision_projection.encoder.linear_fc1.weight"] == (32, 16)
    assert keys["language_model.embedding.word_embeddings.weight"] == (256, 32)
    assert not any(k.startswith(("decoder.", f"{v}0.", f"{lm}0.")) for k in keys)


def test_cli_converts_a_vlm_folder_both_ways(hf_dirs, tmp_path):
    src = hf_dirs["llava_onevision"]
    mc, back = tmp_path / "mc", tmp_path / "back"
    assert main(["hf-to-megatron", str(src), str(mc), "--tp", "2", "--pp", "2", "--quiet"]) == 0
    assert main(["hf-to-megatron", str(src), str(mc), "--tp", "2", "--check"]) == 0
    assert main(["megatron-to-hf", str(mc), str(back), "--quiet"]) == 0
    _assert_same(_tensors(back), _tensors(src), "cli")


def test_unsupported_vlm_input_is_refused_clearly(hf_dirs, tmp_path, capsys):
    with pytest.raises(ValueError, match="projector LayerNorm exists only in"):
        hf_to_megatron(hf_dirs["internvl"], tmp_path / "b", format="legacy", te_spec=False)
    # Qwen2.5-VL: no Megatron-Core module for its vision tower (by name, config and CLI).
    with pytest.raises(ValueError, match=r"no module for Qwen2\.5-VL's vision tower"):
        get_megatron_family("qwen2_5_vl")
    folder = tmp_path / "qwen2_5_vl"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    save_file({"visual.patch_embed.proj.weight": torch.zeros(2)}, folder / "model.safetensors")
    with pytest.raises(ValueError, match="windowed attention"):
        hf_to_megatron(folder, tmp_path / "c", format="legacy")
    assert main(["hf-to-megatron", str(folder), str(tmp_path / "d"), "--format", "legacy"]) != 0
    err = capsys.readouterr().err
    assert "no Megatron mapping for qwen2_5_vl: Megatron-Core has no module" in err
