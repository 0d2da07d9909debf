"""``forge-convert``: conversions, dry run, check mode (catches a flipped tensor), clear errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from forge_ckpt.cli import main
from forge_ckpt.megatron import load_pt


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(config).save_pretrained(out, max_shard_size="8KB")
    return out


def _flip(file: Path, name: str) -> None:
    tensors = load_file(file)
    tensors[name] = -tensors[name]
    save_file(tensors, file, metadata={"format": "pt"})


def test_console_script_and_megatron_round_trip(hf_dir, tmp_path, capsys):
    exe = Path(sys.executable).with_name("forge-convert")
    mc, back = tmp_path / "mc", tmp_path / "back"
    run = subprocess.run(
        [str(exe), "hf-to-megatron", str(hf_dir), str(mc), "--tp", "2", "--pp", "2", "--format", "legacy"],
        capture_output=True, text=True, env={**os.environ, "TQDM_MININTERVAL": "0"}, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "hf -> megatron" in run.stderr  # the progress bar
    assert len(list(mc.glob("iter_0000000/mp_rank_*/model_optim_rng.pt"))) == 4
    assert main(["megatron-to-hf", str(mc), str(back), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["megatron-to-hf", str(mc), str(back), "--check"]) == 0
    assert "check passed: 21 tensors bit-exact" in capsys.readouterr().out
    assert main(["hf-to-megatron", str(hf_dir), str(mc), "--check"]) == 0
    # A flipped tensor in one tensor-parallel shard is caught and named.
    file = mc / "iter_0000000/mp_rank_01_001/model_optim_rng.pt"
    state = load_pt(file, mmap=False)
    state["model"]["decoder.layers.0.mlp.linear_fc2.weight"].neg_()
    torch.save(state, file)
    capsys.readouterr()
    assert main(["hf-to-megatron", str(hf_dir), str(mc), "--check"]) == 1
    out = capsys.readouterr().out
    assert "check FAILED: 1 problem(s)" in out
    assert "decoder.layers.1.mlp.linear_fc2.weight: 192 of 384 values differ" in out


def test_forge_round_trip_dry_run_and_check(hf_dir, tmp_path, capsys):
    forge, back = tmp_path / "forge", tmp_path / "back"
    assert main(["hf-to-forge", str(hf_dir), str(forge), "--vocab-pad-multiple", "8", "--quiet", "--max-shard-size", "4KB"]) == 0  # fmt: skip
    assert json.loads((forge / "forge_mapping.json").read_text())["mapping"] == "llama"
    assert main(["forge-to-hf", str(forge), str(back), "--quiet"]) == 0
    capsys.readouterr()
    assert (
        main(["hf-to-forge", str(hf_dir), str(forge), "--check", "--vocab-pad-multiple", "8"]) == 0
    )
    assert main(["forge-to-hf", str(forge), str(back), "--check"]) == 0
    assert capsys.readouterr().out.count("check passed") == 2
    original = {}
    for f in hf_dir.glob("*.safetensors"):
        original.update(load_file(f))
    again = load_file(back / "model.safetensors")
    assert sorted(again) == sorted(original)
    assert all(torch.equal(again[n], t) for n, t in original.items())
    # Flip one tensor of the converted HF checkpoint: check mode reports it.
    _flip(back / "model.safetensors", "model.layers.1.mlp.up_proj.weight")
    assert main(["forge-to-hf", str(forge), str(back), "--check"]) == 1
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.up_proj.weight: " in out
    assert "values differ" in out
    # Dry runs print the mapping and write nothing.
    assert (
        main(["hf-to-megatron", str(hf_dir), str(tmp_path / "none"), "--dry-run", "--tp", "2"]) == 0
    )
    out = capsys.readouterr().out
    assert not (tmp_path / "none").exists()
    assert (
        "model.layers.0.self_attn.q_proj.weight [16, 16] + model.layers.0.self_attn.k_proj.weight [8, 16]"
        " + model.layers.0.self_attn.v_proj.weight [8, 16] -> decoder.layers.0.self_attention.linear_qkv.weight"
        " [32, 16]  [grouped_qkv("
    ) in out
    assert "-> embedding.word_embeddings.weight [256, 16]  [pad(dim=0" in out
    assert "linear_proj.weight [16, 16]  [copy]  tp: row" in out
    assert main(["hf-to-forge", str(hf_dir), str(tmp_path / "none"), "--dry-run"]) == 0
    assert (
        "-> layers.1.mlp.gate_up_proj.weight [48, 16]  [concat(dim=0)]" in capsys.readouterr().out
    )


def test_every_subcommand_shows_progress_and_dry_runs_write_nothing(hf_dir, tmp_path, capsys):
    forge, mc, back = tmp_path / "forge", tmp_path / "mc", tmp_path / "back"
    # 21 HF tensors -> 19 forge (gate/up fused) -> 15 Megatron (q/k/v fused) -> 21 HF.
    for argv, bar in (
        (["hf-to-forge", hf_dir, forge], r"hf -> forge: 100%\|.+\| 19/19 "),
        (["forge-to-hf", forge, back], r"forge -> hf: 100%\|.+\| 19/19 "),
        (["hf-to-megatron", hf_dir, mc, "--tp", "2"], r"hf -> megatron: 100%\|.+\| 15/15 "),
        (["megatron-to-hf", mc, tmp_path / "back2"], r"megatron -> hf: 21tensor "),
    ):
        assert main([str(a) for a in argv]) == 0
        assert re.search(bar, capsys.readouterr().err), argv[0]
    assert main(["forge-to-hf", str(forge), str(tmp_path / "quiet"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    # Dry runs of the two subcommands that read a converted checkpoint print and write nothing.
    assert main(["forge-to-hf", str(forge), str(tmp_path / "none"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("forge-to-hf (llama): 19 forge tensors\n")
    assert (
        "  layers.1.mlp.gate_up_proj.weight [48, 16] -> model.layers.1.mlp.gate_proj.weight"
        " + model.layers.1.mlp.up_proj.weight  [concat(dim=0)]\n"
    ) in out
    assert "  layers.0.attn.k_proj.weight [8, 16] -> model.layers.0.self_attn.k_proj.weight  [copy]" in out  # fmt: skip
    assert len(out.splitlines()) == 1 + 19
    assert main(["megatron-to-hf", str(mc), str(tmp_path / "none"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        "megatron-to-hf (DistCheckpoint, tp=2, pp=1, vp=1, ep=1, model_type=llama)"
    )
    assert "  -> model.layers.1.self_attn.k_proj.weight [8, 16] float32\n" in out
    assert len(out.splitlines()) == 1 + 21
    assert not (tmp_path / "none").exists()


def test_check_names_a_flipped_tensor_in_a_torch_dist_checkpoint(hf_dir, tmp_path, capsys):
    flipped = tmp_path / "flipped"
    flipped.mkdir()
    for f in hf_dir.iterdir():
        (flipped / f.name).write_bytes(f.read_bytes())
    name = "model.layers.1.self_attn.k_proj.weight"
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    _flip(flipped / index["weight_map"][name], name)
    mc = tmp_path / "mc"
    args = ["--tp", "2", "--pp", "2", "--format", "torch_dist", "--quiet"]
    assert main(["hf-to-megatron", str(flipped), str(mc), *args]) == 0
    assert (mc / "iter_0000000" / ".metadata").is_file()
    capsys.readouterr()
    assert main(["hf-to-megatron", str(flipped), str(mc), "--check"]) == 0
    assert "check passed: 15 tensors bit-exact" in capsys.readouterr().out
    assert main(["hf-to-megatron", str(hf_dir), str(mc), "--check"]) == 1
    out = capsys.readouterr().out
    assert "check FAILED: 1 problem(s) in 15 compared tensors" in out
    # k is a third of the fused layer-1 QKV: 8 of its 32 rows (128 of 512 values), flipped.
    assert "decoder.layers.1.self_attention.linear_qkv.weight: 128 of 512 values differ" in out
    # And the other way: the HF export of the torch_dist checkpoint against the original.
    assert main(["megatron-to-hf", str(mc), str(tmp_path / "back"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["megatron-to-hf", str(mc), str(hf_dir), "--check"]) == 1
    out = capsys.readouterr().out
    assert "check FAILED: 1 problem(s) in 21 compared tensors" in out
    assert f"{name}: 128 of 128 values differ" in out


def test_errors(hf_dir, tmp_path, capsys):
    assert main(["hf-to-megatron", str(hf_dir), str(tmp_path / "a"), "--family", "gpt2"]) == 2
    assert "no Megatron mapping for family 'gpt2'" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["hf-to-forge", str(tmp_path / "empty"), str(tmp_path / "b")]) == 2
    assert "no weights in" in capsys.readouterr().err
    (tmp_path / "noconfig").mkdir()
    for f in hf_dir.glob("*.safetensors*"):
        (tmp_path / "noconfig" / f.name).write_bytes(f.read_bytes())
    assert main(["hf-to-megatron", str(tmp_path / "noconfig"), str(tmp_path / "c")]) == 2
    assert "config.json not found" in capsys.readouterr().err
    assert main(["hf-to-megatron", str(hf_dir), str(tmp_path / "d"), "--family", "qwen3"]) == 2
    err = capsys.readouterr().err
    assert "missing from the checkpoint" in err
    assert "q_norm" in err
    assert main(["megatron-to-hf", str(hf_dir), str(tmp_path / "e"), "--check"]) == 2
    assert "does not exist" in capsys.readouterr().err
