"""Megatron-Core layouts beyond even TP x PP: expert parallelism (legacy ``mp_rank_XX_YYY_ZZZ``
folders, torch_dist expert chunks in their expert rank's data file) and uneven pipeline stages
(``--decoder-first/last-pipeline-num-layers``), each round-tripped HF -> Megatron -> HF bit-exact
and its files checked against the layout computed here by hand."""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import re

import pytest
import torch

from forge_ckpt.megatron import LegacyCheckpoint, hf_to_megatron, load_pt, megatron_to_hf
from forge_ckpt.megatron.layout import parse_rank_dir, rank_dir_name, stage_layers


def _import_sibling(name: str):
    """A sibling test module, by path (forge-ckpt's tests run without forge-core)."""
    spec = importlib.util.spec_from_file_location(
        f"forge_ckpt_tests_{name}", pathlib.Path(__file__).with_name(f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The transformers models and helpers of the HF <-> Megatron tests.
megatron_tests = _import_sibling("test_megatron")
_MOE = megatron_tests._MOE
MOE_CASES = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {**_MOE, "num_experts": 4, "mlp_only_layers": [0]}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {**_MOE, "num_experts": 4, "decoder_sparse_step": 2, "shared_expert_intermediate_size": 6}),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", {
        **_MOE, "num_key_value_heads": 4, "n_routed_experts": 4, "n_shared_experts": 1, "n_group": 2,
        "topk_group": 1, "first_k_dense_replace": 1, "q_lora_rank": 6, "kv_lora_rank": 6,
        "qk_nope_head_dim": 4, "qk_rope_head_dim": 2, "v_head_dim": 3,
    }),
    "llama5": ("LlamaConfig", "LlamaForCausalLM", {"num_hidden_layers": 5, "tie_word_embeddings": True}),
}  # fmt: skip


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    return megatron_tests.save_hf_models(tmp_path_factory, MOE_CASES)


_tensors = megatron_tests._tensors


def _assert_round_trip(hf_dir, mc, out, tag):
    original = _tensors(hf_dir)
    back = _tensors(megatron_to_hf(mc, out, max_shard_size="6KB"))
    assert sorted(back) == sorted(original), tag
    for name, t in original.items():
        assert torch.equal(back[name], t), (tag, name)


# --------------------------------------------------------------------------------------------
# Expert parallelism
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "deepseek_v3"])
def test_expert_parallel_round_trip_is_bit_exact(hf_dirs, tmp_path, family, fmt):
    for tp, pp, ep, te in ((2, 1, 2, True), (2, 2, 4, False)):
        tag = f"tp{tp}-pp{pp}-ep{ep}-{te}"
        mc = hf_to_megatron(
            hf_dirs[family], tmp_path / f"mc-{tag}", tensor_parallel=tp, pipeline_parallel=pp,
            expert_parallel=ep, format=fmt, te_spec=te, grouped_gemm=not te,
        )  # fmt: skip
        _assert_round_trip(hf_dirs[family], mc, tmp_path / f"hf-{tag}", tag)


def test_legacy_expert_parallel_layout(hf_dirs, tmp_path):
    """Megatron-LM's ``mp_rank_{tp:02d}_{ep:03d}`` folders (no PP) hold rank-local experts."""
    hf = _tensors(hf_dirs["qwen3_moe"])  # layer 0 dense, layer 1 MoE with 4 experts
    root = hf_to_megatron(
        hf_dirs["qwen3_moe"], tmp_path / "mc", tensor_parallel=2, expert_parallel=2,
        format="legacy",
    )  # fmt: skip
    it = root / "iter_0000000"
    assert sorted(p.name for p in it.iterdir()) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001",
    ]  # fmt: skip
    state = {
        (t, e): load_pt(it / f"mp_rank_{t:02d}_{e:03d}/model_optim_rng.pt")
        for t in range(2)
        for e in range(2)
    }
    args = state[0, 0]["args"]
    assert isinstance(args, argparse.Namespace)
    assert (args.expert_model_parallel_size, args.pipeline_model_parallel_size) == (2, 1)
    assert args.expert_tensor_parallel_size == 2
    x = "decoder.layers.1.mlp.experts.local_experts"
    for (t, e), s in state.items():
        m = s["model"]
        experts = sorted({n.split(".")[6] for n in m if n.startswith(x)})
        assert experts == ["0", "1"], (t, e)  # two local experts on each expert rank
        for j in range(2):  # global expert 2e + j, TP-split as the dense MLP
            gate = hf[f"model.layers.1.mlp.experts.{2 * e + j}.gate_proj.weight"]
            up = hf[f"model.layers.1.mlp.experts.{2 * e + j}.up_proj.weight"]
            down = hf[f"model.layers.1.mlp.experts.{2 * e + j}.down_proj.weight"]
            fc1 = torch.cat([gate[2 * t : 2 * t + 2], up[2 * t : 2 * t + 2]])
            assert torch.equal(m[f"{x}.{j}.linear_fc1.weight"], fc1), (t, e, j)
            assert torch.equal(m[f"{x}.{j}.linear_fc2.weight"], down[:, 2 * t : 2 * t + 2])
        # Everything else is the same on both expert ranks.
        ref = state[t, 0]["model"]
        for n in ref:
            if not n.startswith(x):
                assert torch.equal(m[n], ref[n]), (t, e, n)
    ckpt = LegacyCheckpoint(root)
    assert (ckpt.tensor_parallel, ckpt.pipeline_parallel, ckpt.expert_parallel) == (2, 1, 2)


def test_torch_dist_expert_chunks_live_in_their_expert_ranks_file(hf_dirs, tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    root = hf_to_megatron(
        hf_dirs["qwen3_moe"], tmp_path / "mc", tensor_parallel=2, pipeline_parallel=2,
        expert_parallel=2,
    )  # fmt: skip
    it = root / "iter_0000000"
    md = FileSystemReader(it).read_metadata()
    assert sorted(p.name for p in it.glob("*.distcp")) == [f"__{k}_0.distcp" for k in range(4)]
    fc1 = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
    assert tuple(md.state_dict_metadata[fc1].size) == (2, 4, 8, 16)  # global experts, any split
    seen = set()
    for index, info in md.storage_data.items():
        if index.fqn == fc1:
            layer, expert = int(index.offset[0]), int(index.offset[1])
            assert layer == 1  # stage 1 (the MoE layer): files __2 (ep 0) and __3 (ep 1)
            assert info.relative_path == f"__{2 + expert // 2}_0.distcp", index
            seen.add(expert)
        elif index.fqn.startswith("decoder.layers.") and ".experts." not in index.fqn:
            assert info.relative_path in {"__0_0.distcp", "__2_0.distcp"}, index  # ep rank 0
    assert seen == {0, 1, 2, 3}


def test_ambiguous_two_part_rank_folders_follow_the_args(hf_dirs, tmp_path):
    assert rank_dir_name(1, 2, 4, 3, 8) == "mp_rank_01_002_003"
    assert rank_dir_name(1, 0, 1, 3, 8) == "mp_rank_01_003"
    assert rank_dir_name(1, 2, 4) == "mp_rank_01_002"
    assert parse_rank_dir("mp_rank_01_003", expert_parallel=True) == (1, 0, 3)
    assert parse_rank_dir("mp_rank_01_003", expert_parallel=False) == (1, 3, 0)
    assert parse_rank_dir("mp_rank_01_002_003", expert_parallel=True) == (1, 2, 3)
    assert parse_rank_dir("mp_rank_01", expert_parallel=False) == (1, 0, 0)
    assert parse_rank_dir("common.pt", expert_parallel=False) is None
    # Expert ranks must each hold the same copy of the dense tensors.
    root = hf_to_megatron(hf_dirs["qwen3_moe"], tmp_path / "mc", expert_parallel=2, format="legacy")
    file = root / "iter_0000000/mp_rank_00_001/model_optim_rng.pt"
    state = load_pt(file, mmap=False)
    state["model"]["decoder.final_layernorm.weight"] += 1
    torch.save(state, file)
    with pytest.raises(ValueError, match="same on every expert rank"):
        list(LegacyCheckpoint(root).iter_tensors())


def test_forge_convert_ep_and_uneven_stages(hf_dirs, tmp_path, capsys):
    from forge_ckpt.cli import main

    src, mc, back = hf_dirs["deepseek_v3"], tmp_path / "mc", tmp_path / "back"
    argv = ["hf-to-megatron", str(src), str(mc), "--tp", "2", "--ep", "2", "--format", "legacy"]
    assert main([*argv, "--dry-run"]) == 0
    assert "tp=2, pp=1, ep=2" in capsys.readouterr().out
    assert main([*argv, "--quiet"]) == 0
    assert (mc / "iter_0000000/mp_rank_01_001/model_optim_rng.pt").is_file()
    assert main(["hf-to-megatron", str(src), str(mc), "--check"]) == 0
    assert main(["megatron-to-hf", str(mc), str(back), "--quiet"]) == 0
    assert main(["megatron-to-hf", str(mc), str(back), "--check"]) == 0
    uneven = tmp_path / "uneven"
    argv = ["hf-to-megatron", str(hf_dirs["llama5"]), str(uneven), "--pp", "3", "--quiet"]
    assert main([*argv, "--first-stage-layers", "1", "--last-stage-layers", "2"]) == 0
    _assert_round_trip(hf_dirs["llama5"], uneven, tmp_path / "hf-uneven", "cli")


def test_expert_parallel_errors_are_clear(hf_dirs, tmp_path):
    with pytest.raises(ValueError, match="do not split evenly into 3 expert-parallel"):
        hf_to_megatron(hf_dirs["qwen3_moe"], tmp_path / "a", expert_parallel=3)
    with pytest.raises(ValueError, match="needs a mixture-of-experts model"):
        hf_to_megatron(hf_dirs["llama5"], tmp_path / "b", expert_parallel=2)


# --------------------------------------------------------------------------------------------
# Uneven pipeline stages
# --------------------------------------------------------------------------------------------


def test_stage_layers_follow_megatrons_first_and_last_counts():
    assert stage_layers(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert stage_layers(5, 3, first=1, last=2) == [range(0, 1), range(1, 3), range(3, 5)]
    assert stage_layers(7, 3, first=1) == [range(0, 1), range(1, 4), range(4, 7)]
    assert stage_layers(7, 4, last=1) == [range(0, 2), range(2, 4), range(4, 6), range(6, 7)]
    assert stage_layers(5, 2, first=3, last=2) == [range(0, 3), range(3, 5)]
    with pytest.raises(ValueError, match="share the remaining 5 layers evenly"):
        stage_layers(6, 3, first=1)
    with pytest.raises(ValueError, match="at least 1 layer"):
        stage_layers(6, 3, first=0)
    with pytest.raises(ValueError, match="pipeline_parallel > 1"):
        stage_layers(6, 1, last=2)
    with pytest.raises(ValueError, match="with first=3, last=3"):
        stage_layers(5, 2, first=3, last=3)


@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
def test_uneven_pipeline_round_trip_and_detection(hf_dirs, tmp_path, fmt):
    """5 layers over 3 stages as 1 + 2 + 2 and 2 + 2 + 1 (tied embeddings, TP2)."""
    for first, last, counts in ((1, None, [1, 2, 2]), (None, 1, [2, 2, 1])):
        tag = f"{first}-{last}"
        mc = hf_to_megatron(
            hf_dirs["llama5"], tmp_path / f"mc-{tag}", tensor_parallel=2, pipeline_parallel=3,
            first_stage_layers=first, last_stage_layers=last, format=fmt,
        )  # fmt: skip
        _assert_round_trip(hf_dirs["llama5"], mc, tmp_path / f"hf-{tag}", tag)
        if fmt != "legacy":
            continue
        it = mc / "iter_0000000"
        for s, n in enumerate(counts):  # stage-local layer numbers 0..n-1 in each stage's files
            m = load_pt(it / f"mp_rank_01_{s:03d}/model_optim_rng.pt")["model"]
            layers = {int(k.split(".")[2]) for k in m if k.startswith("decoder.layers.")}
            assert layers == set(range(n)), (tag, s)
        # Detected from the files alone: without the args' first/last counts as well.
        for file in it.glob("*/model_optim_rng.pt"):
            state = load_pt(file, mmap=False)
            for key in ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers"):
                vars(state["args"]).pop(key, None)
            del state["args"].num_layers
            torch.save(state, file)
        ckpt = LegacyCheckpoint(mc)
        names = [n for n, _ in ckpt.iter_tensors()]
        assert ckpt.stage_layers == stage_layers(5, 3, first=first, last=last), tag
        assert "decoder.layers.4.mlp.linear_fc2.weight" in names


def test_legacy_stage_layers_that_contradict_the_args_are_refused(hf_dirs, tmp_path):
    mc = hf_to_megatron(
        hf_dirs["llama5"], tmp_path / "mc", pipeline_parallel=3, first_stage_layers=1,
        format="legacy",
    )  # fmt: skip
    for file in (mc / "iter_0000000").glob("*/model_optim_rng.pt"):
        state = load_pt(file, mmap=False)
        state["args"].decoder_first_pipeline_num_layers = 3
        state["args"].decoder_last_pipeline_num_layers = 1
        torch.save(state, file)
    with pytest.raises(
        ValueError, match=re.escape("stage 0 holds layers 0..0 but the args' split puts 0..2")
    ):
        list(LegacyCheckpoint(mc).iter_tensors())


# --------------------------------------------------------------------------------------------
# DeepSeek-V3 multi-token prediction layers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mtp_dir(hf_dirs, tmp_path_factory) -> pathlib.Path:
    """The tiny DeepSeek-V3 checkpoint plus one MTP layer as DeepSeek's release stores it
    (``model.layers.2.*``: a MoE decoder layer, enorm / hnorm / eh_proj / shared_head.norm, and
    copies of the embedding and the head)."""
    import json

    from safetensors.torch import save_file

    plain = _tensors(hf_dirs["deepseek_v3"])
    gen = torch.Generator().manual_seed(1)
    layer = {
        "model.layers.2." + n.removeprefix("model.layers.1."): torch.randn(t.shape, generator=gen)
        for n, t in plain.items()
        if n.startswith("model.layers.1.")
    }
    for name, shape in (("enorm", (16,)), ("hnorm", (16,)), ("shared_head.norm", (16,))):
        layer[f"model.layers.2.{name}.weight"] = torch.randn(shape, generator=gen)
    layer["model.layers.2.eh_proj.weight"] = torch.randn(16, 32, generator=gen)
    layer["model.layers.2.embed_tokens.weight"] = plain["model.embed_tokens.weight"].clone()
    layer["model.layers.2.shared_head.head.weight"] = plain["lm_head.weight"].clone()
    out = tmp_path_factory.mktemp("mtp") / "ckpt"
    out.mkdir()
    save_file(plain | layer, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((hf_dirs["deepseek_v3"] / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    return out


@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
def test_deepseek_mtp_layers_round_trip_through_megatron(mtp_dir, tmp_path, fmt):
    hf = _tensors(mtp_dir)
    mc = hf_to_megatron(
        mtp_dir, tmp_path / "mc", tensor_parallel=2, pipeline_parallel=2, expert_parallel=2,
        format=fmt,
    )  # fmt: skip
    _assert_round_trip(mtp_dir, mc, tmp_path / "hf", fmt)  # the copies included
    it = mc / "iter_0000000"
    m = "mtp.layers.0"
    if fmt == "legacy":
        last = load_pt(it / "mp_rank_01_001_001/model_optim_rng.pt")  # tp 1, last stage, ep 1
        assert last["args"].mtp_num_layers == 1
        state = last["model"]
        eh = hf["model.layers.2.eh_proj.weight"]
        assert torch.equal(state[f"{m}.eh_proj.weight"], eh[8:])  # column parallel
        assert torch.equal(state[f"{m}.enorm.weight"], hf["model.layers.2.enorm.weight"])
        assert torch.equal(
            state[f"{m}.final_layernorm.weight"], hf["model.layers.2.shared_head.norm.weight"]
        )
        down = hf["model.layers.2.mlp.experts.3.down_proj.weight"]  # expert 3 = rank 1's 1
        fc2 = state[f"{m}.transformer_layer.mlp.experts.local_experts.1.linear_fc2.weight"]
        assert torch.equal(fc2, down[:, 2:])
        first = load_pt(it / "mp_rank_00_000_000/model_optim_rng.pt")["model"]
        assert not any(n.startswith("mtp.") for n in first)  # MTP on the last stage only
    else:
        from torch.distributed.checkpoint import FileSystemReader

        md = FileSystemReader(it).read_metadata().state_dict_metadata
        fc1 = md[f"{m}.transformer_layer.mlp.experts.experts.linear_fc1.weight"]
        assert tuple(fc1.size) == (4, 8, 16)  # [experts, 2 * moe_ffn, hidden]: no layer axis
        assert tuple(md[f"{m}.eh_proj.weight"].size) == (16, 32)
        assert f"{m}.transformer_layer.self_attention.linear_proj.weight" in md
