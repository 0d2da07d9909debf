"""DeepSeek-V3's multi-token prediction (MTP) layers: a transformers checkpoint with the MTP
tensors of DeepSeek's release added by hand (``model.layers.{num_hidden_layers}.*``, the
embedding and head copies included) loads into ``mtp.0.*``, saves back bit-exact, refuses a copy
that differs, can be loaded without its MTP layers, and shows in the dry run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from forge_ckpt import CheckpointMismatchError
from forge_ckpt.cli import main
from forge_ckpt.convert import load_hf_as_forge, save_forge_as_hf
from forge_ckpt.mapping import get_mapping

H, LAYERS, EXPERTS, V = 16, 2, 4, 61
_CONFIG = {
    "vocab_size": V, "hidden_size": H, "intermediate_size": 24, "num_hidden_layers": LAYERS,
    "num_attention_heads": 4, "num_key_value_heads": 4, "moe_intermediate_size": 4,
    "num_experts_per_tok": 2, "n_routed_experts": EXPERTS, "n_shared_experts": 1, "n_group": 2,
    "topk_group": 1, "first_k_dense_replace": 1, "q_lora_rank": 6, "kv_lora_rank": 6,
    "qk_nope_head_dim": 4, "qk_rope_head_dim": 2, "v_head_dim": 3,
}  # fmt: skip
MTP = f"model.layers.{LAYERS}"  # the MTP layer of depth 0


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _write(folder: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory) -> Path:
    """A tiny transformers DeepSeek-V3 checkpoint (no MTP: transformers does not hold it)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.DeepseekV3Config(**_CONFIG)
    out = tmp_path_factory.mktemp("plain")
    transformers.DeepseekV3ForCausalLM(config).save_pretrained(out)
    return out


def _mtp_tensors(plain: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    """DeepSeek's MTP layer: a decoder layer shaped like the last (MoE) one, random, plus the
    MTP parts and the copies of the embedding and the head."""
    gen = torch.Generator().manual_seed(seed)
    last = f"model.layers.{LAYERS - 1}."
    layer = {
        f"{MTP}.{n.removeprefix(last)}": torch.randn(t.shape, generator=gen).to(t.dtype)
        for n, t in plain.items()
        if n.startswith(last)
    }
    parts = {"enorm.weight": (H,), "hnorm.weight": (H,), "eh_proj.weight": (H, 2 * H)}
    parts["shared_head.norm.weight"] = (H,)
    layer |= {f"{MTP}.{n}": torch.randn(s, generator=gen) for n, s in parts.items()}
    layer[f"{MTP}.embed_tokens.weight"] = plain["model.embed_tokens.weight"].clone()
    layer[f"{MTP}.shared_head.head.weight"] = plain["lm_head.weight"].clone()
    return layer


@pytest.fixture(scope="module")
def mtp_dir(plain_dir, tmp_path_factory) -> Path:
    """``plain_dir`` with one MTP layer added as DeepSeek's release stores it."""
    plain = _tensors(plain_dir)
    config = json.loads((plain_dir / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    return _write(tmp_path_factory.mktemp("mtp") / "ckpt", plain | _mtp_tensors(plain), config)


def test_mtp_tensors_land_in_mtp_params_and_save_back_bit_exact(mtp_dir, tmp_path):
    hf = _tensors(mtp_dir)
    spec = get_mapping("deepseek_v3")
    assert (
        spec.context(json.loads((mtp_dir / "config.json").read_text()), **spec.detect_context(hf))[
            "mtp_depth"
        ]
        == 1
    )
    forge, config = load_hf_as_forge(mtp_dir, mtp_depth=1)
    mtp = {n: t for n, t in forge.items() if n.startswith("mtp.")}
    assert sorted({n.split(".")[1] for n in mtp}) == ["0"]
    for forge_name, hf_name in {
        "mtp.0.enorm.weight": "enorm.weight",
        "mtp.0.hnorm.weight": "hnorm.weight",
        "mtp.0.eh_proj.weight": "eh_proj.weight",
        "mtp.0.norm.weight": "shared_head.norm.weight",
        "mtp.0.block.attn_norm.weight": "input_layernorm.weight",
        "mtp.0.block.mlp_norm.weight": "post_attention_layernorm.weight",
        "mtp.0.block.attn.q_a_proj.weight": "self_attn.q_a_proj.weight",
        "mtp.0.block.attn.kv_b_proj.weight": "self_attn.kv_b_proj.weight",
        "mtp.0.block.mlp.router.weight": "mlp.gate.weight",
        "mtp.0.block.mlp.expert_bias": "mlp.gate.e_score_correction_bias",
        "mtp.0.block.mlp.shared_expert.down_proj.weight": "mlp.shared_experts.down_proj.weight",
    }.items():
        assert torch.equal(mtp.pop(forge_name), hf[f"{MTP}.{hf_name}"]), forge_name
    gate_up = mtp.pop("mtp.0.block.mlp.experts.gate_up_proj")
    down = mtp.pop("mtp.0.block.mlp.experts.down_proj")
    for e in range(EXPERTS):
        gate, up = (hf[f"{MTP}.mlp.experts.{e}.{p}_proj.weight"] for p in ("gate", "up"))
        assert torch.equal(gate_up[e], torch.cat([gate, up]))
        assert torch.equal(down[e], hf[f"{MTP}.mlp.experts.{e}.down_proj.weight"])
    # The rest of the MTP block is the same layer mapping as a main MoE layer's.
    rest = {n.removeprefix("mtp.0.block.") for n in mtp}
    main_moe = {n.removeprefix(f"layers.{LAYERS - 1}.") for n in forge if n.startswith("layers.1.")}
    assert rest < main_moe
    assert "mlp.shared_expert.gate_up_proj.weight" in rest
    # Forge -> HF writes every tensor back bit for bit, the two copies included.
    out = save_forge_as_hf(forge, tmp_path / "back", config=config, mtp_depth=1)
    back = _tensors(out)
    assert sorted(back) == sorted(hf)
    assert all(back[n].dtype == hf[n].dtype and torch.equal(back[n], hf[n]) for n in hf)
    assert torch.equal(back[f"{MTP}.embed_tokens.weight"], back["model.embed_tokens.weight"])


def test_forge_model_with_mtp_loads_and_saves_the_checkpoint(plain_dir, mtp_dir, tmp_path):
    forge_models = pytest.importorskip("forge_models")
    hf = _tensors(mtp_dir)
    model = forge_models.from_pretrained(mtp_dir)  # as many MTP modules as the checkpoint has
    assert model.config.mtp_depth == 1
    module = model.mtp[0]
    assert module.block.layer_idx == LAYERS
    assert module.block.is_moe
    assert torch.equal(module.eh_proj.weight, hf[f"{MTP}.eh_proj.weight"])
    assert torch.equal(module.norm.weight, hf[f"{MTP}.shared_head.norm.weight"])
    assert torch.equal(
        module.block.attn.kv_a_proj.weight, hf[f"{MTP}.self_attn.kv_a_proj_with_mqa.weight"]
    )
    back = _tensors(forge_models.save_pretrained(model, tmp_path / "back"))
    assert sorted(back) == sorted(hf)
    assert all(torch.equal(back[n], hf[n]) for n in hf)
    # transformers' checkpoint (no MTP tensors, num_nextn_predict_layers=1) builds no MTP.
    assert len(forge_models.from_pretrained(plain_dir).mtp) == 0
    # Built without MTP, the model loads the same checkpoint and drops its MTP layer.
    plain = forge_models.from_pretrained(mtp_dir, mtp_depth=0)
    assert len(plain.mtp) == 0
    assert torch.equal(plain.lm_head.weight, model.lm_head.weight)


def test_a_copy_that_differs_from_its_source_is_refused(mtp_dir, tmp_path):
    tensors = _tensors(mtp_dir)
    config = json.loads((mtp_dir / "config.json").read_text())
    tensors[f"{MTP}.shared_head.head.weight"][3, 5] += 1
    bad = _write(tmp_path / "bad", tensors, config)
    with pytest.raises(
        ValueError, match=r"shared_head\.head\.weight should be an exact copy of lm_head"
    ):
        load_hf_as_forge(bad, mtp_depth=1)
    # A missing copy is a missing tensor, named.
    del tensors[f"{MTP}.embed_tokens.weight"]
    lacking = _write(tmp_path / "lacking", tensors, config)
    with pytest.raises(CheckpointMismatchError, match=rf"{MTP}\.embed_tokens\.weight"):
        load_hf_as_forge(lacking, mtp_depth=1)


def test_without_mtp_nothing_changes_and_mtp_can_be_dropped(plain_dir, mtp_dir):
    spec = get_mapping("deepseek_v3")
    plain_hf = _tensors(plain_dir)
    config = json.loads((plain_dir / "config.json").read_text())
    # transformers writes num_nextn_predict_layers=1 but no MTP tensors: the probe sees that.
    assert config["num_nextn_predict_layers"] == 1
    ctx = spec.context(config, **spec.detect_context(plain_hf))
    assert ctx["mtp_depth"] == 0
    assert ctx["num_hf_layers"] == LAYERS
    assert not ctx["ignored_hf_layers"]
    assert sorted(spec.hf_names(ctx)) == sorted(plain_hf)
    plain, _ = load_hf_as_forge(plain_dir, **spec.detect_context(plain_hf))
    assert not any(n.startswith("mtp.") for n in plain)
    # The MTP checkpoint into a model without MTP: the same tensors as before, MTP dropped.
    dropped, _ = load_hf_as_forge(mtp_dir, mtp_depth=0)
    assert sorted(dropped) == sorted(plain)
    assert all(torch.equal(dropped[n], plain[n]) for n in plain)
    mtp_ctx = spec.context(json.loads((mtp_dir / "config.json").read_text()), mtp_depth=0)
    assert "(ignored: checkpoint layer 2, not loaded into this model)" in spec.describe(mtp_ctx)
    # More MTP modules than the checkpoint holds: the missing layer is named.
    with pytest.raises(CheckpointMismatchError, match=r"model\.layers\.3\.eh_proj\.weight"):
        load_hf_as_forge(mtp_dir, mtp_depth=2)


def test_megatron_export_keeps_the_mtp_layers(mtp_dir, tmp_path):
    """The MTP layer goes to Megatron-Core's ``mtp.layers.0.*`` and back (the Megatron layouts
    are tested in test_megatron_layouts.py)."""
    from forge_ckpt.megatron import hf_to_megatron, load_pt, megatron_to_hf

    mc = hf_to_megatron(mtp_dir, tmp_path / "mc", format="legacy")
    state = load_pt(mc / "iter_0000000/mp_rank_00/model_optim_rng.pt")["model"]
    assert torch.equal(
        state["mtp.layers.0.eh_proj.weight"], _tensors(mtp_dir)[f"{MTP}.eh_proj.weight"]
    )
    back = _tensors(megatron_to_hf(mc, tmp_path / "hf"))
    original = _tensors(mtp_dir)
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[n], t) for n, t in original.items())


def test_dry_run_lists_the_mtp_rows_and_cli_check_passes(mtp_dir, tmp_path, capsys):
    spec = get_mapping("deepseek_v3")
    config = json.loads((mtp_dir / "config.json").read_text())
    ctx = spec.context(config, **spec.detect_context(_tensors(mtp_dir)))
    text = spec.describe(ctx)
    assert f"mtp.0.eh_proj.weight <- {MTP}.eh_proj.weight" in text
    assert f"mtp.0.block.mlp.experts.gate_up_proj <- {MTP}.mlp.experts.0.gate_proj.weight" in text
    assert f"copies, written on export, checked on import: {MTP}.embed_tokens.weight" in text
    # forge-convert reads the MTP depth from the tensor names: its dry run lists the MTP rows,
    # and hf -> forge -> hf through it gives back every tensor, copies included, bit for bit.
    assert main(["hf-to-forge", str(mtp_dir), str(tmp_path / "dry"), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert f"{MTP}.eh_proj.weight [16, 32] -> mtp.0.eh_proj.weight [16, 32]" in listing
    assert f"+ {MTP}.embed_tokens.weight" in listing
    out = tmp_path / "forge"
    assert main(["hf-to-forge", str(mtp_dir), str(out), "--quiet"]) == 0
    assert any(name.startswith("mtp.0.") for name in _tensors(out))
    capsys.readouterr()
    assert main(["hf-to-forge", str(mtp_dir), str(out), "--check"]) == 0
    assert "check passed" in capsys.readouterr().out
    back = tmp_path / "hf"
    assert main(["forge-to-hf", str(out), str(back), "--quiet"]) == 0
    original, written = _tensors(mtp_dir), _tensors(back)
    assert sorted(written) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(written[name], tensor), name
