"""Megatron-Core layouts beyond even TP x PP: expert parallelism (legacy ``mp_rank_XX_YYY_ZZZ``
folders, torch_dist expert chunks in their expert rank's data file), uneven pipeline stages
(``--decoder-first/last-pipeline-num-layers``) and virtual (interleaved) pipeline stages and
custom pipeline layouts (legacy ``model0``/``model1`` chunks), each round-tripped HF -> Megatron
-> HF bit-exact and its files checked against the layout computed here by hand."""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import re

import pytest
import torch

from forge_ckpt.megatron import LegacyCheckpoint, hf_to_megatron, load_pt, megatron_to_hf
from forge_ckpt.megatron.layout import parse_rank_dir, rank_dir_name, stage_layers
from forge_ckpt.megatron.virtual_pipeline import (
    parse_pipeline_layout,
    pipeline_chunks,
    virtual_size_from_args,
)


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
    "llama8": ("LlamaConfig", "LlamaForCausalLM", {"num_hidden_layers": 8, "tie_word_embeddings": True}),
    "qwen3_moe4": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {**_MOE, "num_hidden_layers": 4, "num_experts": 4, "mlp_only_layers": [0]}),
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
    fc1 = "decoder.layers.1.mlp.experts.experts.linear_fc1.weight"  # per layer: dense + MoE
    assert tuple(md.state_dict_metadata[fc1].size) == (4, 8, 16)  # global experts, any split
    seen = set()
    for index, info in md.storage_data.items():
        if index.fqn == fc1:
            expert = int(index.offset[0])
            # stage 1 (the MoE layer): files __2 (ep 0) and __3 (ep 1)
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


# --------------------------------------------------------------------------------------------
# Virtual (interleaved) pipeline stages and custom pipeline layouts
# --------------------------------------------------------------------------------------------


def _megatron_chunk(n, pp, vp, first, last, r, v) -> range:
    """Megatron-Core 0.16's ``get_num_layers_to_build`` and ``get_transformer_layer_offset``
    (no pipeline layout, no embedding/loss in the split), transcribed: chunk ``v`` of rank
    ``r`` (``vp == 1``: Megatron's ``virtual_pipeline_model_parallel_size`` is ``None``)."""
    if first is None and last is None:
        per_rank = n // pp
        offset = v * (n // vp) + r * (per_rank // vp) if vp > 1 else r * per_rank
        return range(offset, offset + per_rank // vp)
    fixed = (first or 0) + (last or 0)
    middle_stages = pp - (first is not None) - (last is not None)
    per_rank = (n - fixed) // middle_stages if middle_stages > 0 else 0
    middle_per_rank = per_rank
    per_rank = first if r == 0 and first is not None else per_rank
    per_rank = last if r == pp - 1 and last is not None else per_rank
    middle_rank = r if first is None else r - 1
    if vp == 1:
        offset = 0 if r == 0 else middle_rank * middle_per_rank + (first or 0)
    else:
        f_v, l_v, m_v = (first or 0) // vp, (last or 0) // vp, (n - fixed) // vp
        total = f_v + m_v + l_v
        offset = v * total if r == 0 else v * total + f_v + middle_rank * (m_v // middle_stages)
    return range(offset, offset + per_rank // vp)


def test_pipeline_chunks_are_megatrons_virtual_split():
    checked = 0
    for n in range(2, 17):
        for pp in (2, 3, 4):
            for vp in (1, 2, 3, 4):
                for first in (None, 1, 2, 3, 4):
                    for last in (None, 1, 2, 3, 4):
                        try:
                            chunks = pipeline_chunks(n, pp, virtual=vp, first=first, last=last)
                        except ValueError:
                            continue
                        want = [
                            _megatron_chunk(n, pp, vp, first, last, r, v)
                            for v in range(vp)
                            for r in range(pp)
                        ]
                        assert chunks == want, (n, pp, vp, first, last)
                        checked += vp > 1
    assert checked > 100
    assert pipeline_chunks(8, 2, virtual=2) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    # Megatron's own example: 8 layers, 2 stages, 4 chunks each: stage 0 holds [0] [2] [4] [6].
    assert pipeline_chunks(8, 2, virtual=4)[::2] == [range(k, k + 1) for k in (0, 2, 4, 6)]
    assert pipeline_chunks(8, 2, virtual=2, first=2) == [
        range(0, 1), range(1, 4), range(4, 5), range(5, 8),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="divides by the 0 middle stages"):
        pipeline_chunks(8, 2, virtual=2, first=2, last=6)
    with pytest.raises(ValueError, match="3 layers, which do not split into 2 virtual stages"):
        pipeline_chunks(6, 2, virtual=2)
    with pytest.raises(ValueError, match="need pipeline_parallel > 1"):
        pipeline_chunks(4, 1, virtual=2)
    with pytest.raises(ValueError, match="must be >= 1"):
        pipeline_chunks(4, 2, virtual=0)


def test_pipeline_layout_strings_are_parsed_as_megatron_does():
    # Megatron-Core's docstring example (its MTP layer moved into the last chunk): 32 chunks.
    chunks = parse_pipeline_layout("Et*3|(tt|)*30,mL", 16)
    assert len(chunks) == 32
    assert chunks[0] == "Ettt"
    assert chunks[1:31] == ["tt"] * 30
    assert chunks[-1] == "mL"
    assert parse_pipeline_layout("E|(t|)*2tL", 2) == ["E", "t", "t", "tL"]
    assert pipeline_chunks(6, 2, layout="Et|tt|ttt|L") == [
        range(0, 1), range(1, 3), range(3, 6), range(6, 6),
    ]  # fmt: skip
    assert virtual_size_from_args(
        {"pipeline_model_parallel_size": 2, "pipeline_model_parallel_layout": "Et|tt|ttt|L"}
    ) == 2  # fmt: skip
    assert virtual_size_from_args({"num_layers": 8, "pipeline_model_parallel_size": 2,
                                   "num_layers_per_virtual_pipeline_stage": 2}) == 2  # fmt: skip
    assert virtual_size_from_args({"virtual_pipeline_model_parallel_size": None}) == 1
    for layout, pp, match in (
        ("Et|tL", 3, "2 chunks, not a multiple of pipeline_parallel=3"),
        ("Ex|tL", 2, "unknown item"),
        ("tE|tL", 2, "chunk 0 is 'tE'"),
        ("Et|Lt", 2, "chunk 1 is 'Lt'"),
        ("Et|m|t|L", 2, "chunk 1 is 'm'"),  # a standalone MTP stage
    ):
        with pytest.raises(ValueError, match=re.escape(match)):
            parse_pipeline_layout(layout, pp)
    with pytest.raises(ValueError, match="places 3 decoder layers"):
        pipeline_chunks(4, 2, layout="Et|t|t|L")
    with pytest.raises(ValueError, match="has 2 virtual stage"):
        pipeline_chunks(3, 2, virtual=3, layout="Et|t|t|L")
    with pytest.raises(ValueError, match="drop first/last"):
        pipeline_chunks(3, 2, first=1, layout="Et|t|t|L")


VIRTUAL_SPLITS = {  # name -> (family, hf_to_megatron options, layers of each chunk v * pp + r)
    "vp2": ("llama8", {"virtual_pipeline": 2}, [2, 2, 2, 2]),
    "vp2-uneven": ("llama8", {"virtual_pipeline": 2, "first_stage_layers": 2}, [1, 3, 1, 3]),
    "layout": ("llama8", {"pipeline_layout": "Et|ttt|t|tt,tL"}, [1, 3, 1, 3]),
    "moe-vp2-ep2": ("qwen3_moe4", {"virtual_pipeline": 2, "expert_parallel": 2}, [1, 1, 1, 1]),
}  # fmt: skip


@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
@pytest.mark.parametrize("split", sorted(VIRTUAL_SPLITS))
def test_virtual_pipeline_round_trip_is_bit_exact(hf_dirs, tmp_path, split, fmt):
    family, options, counts = VIRTUAL_SPLITS[split]
    mc = hf_to_megatron(
        hf_dirs[family], tmp_path / "mc", tensor_parallel=2, pipeline_parallel=2, format=fmt,
        **options,
    )  # fmt: skip
    _assert_round_trip(hf_dirs[family], mc, tmp_path / "hf", split)
    if fmt == "legacy":
        ckpt = LegacyCheckpoint(mc)
        list(ckpt.iter_tensors())
        assert ckpt.virtual_pipeline == 2
        assert [len(c) for c in ckpt.stage_layers] == counts


def test_legacy_virtual_stages_hold_model_chunks(hf_dirs, tmp_path):
    """Rank r's file holds ``model0`` (chunk v=0) and ``model1`` with chunk-local layer numbers:
    8 layers, 2 stages x 2 chunks, first stage 2 layers (the last 6): rank 0 = [0] [4], rank 1 = [1-3]
    [5-7]; the embedding in rank 0's model0, the head (a copy: tied) in rank 1's model1."""
    hf = _tensors(hf_dirs["llama8"])
    root = hf_to_megatron(
        hf_dirs["llama8"], tmp_path / "mc", tensor_parallel=2, pipeline_parallel=2,
        virtual_pipeline=2, first_stage_layers=2, format="legacy",
    )  # fmt: skip
    it = root / "iter_0000000"
    global_layers = {(0, 0): [0], (0, 1): [4], (1, 0): [1, 2, 3], (1, 1): [5, 6, 7]}
    for t in range(2):
        for s in range(2):
            state = load_pt(it / f"mp_rank_{t:02d}_{s:03d}/model_optim_rng.pt")
            assert sorted(k for k in state if k.startswith("model")) == ["model0", "model1"]
            args = state["args"]
            assert args.virtual_pipeline_model_parallel_size == 2
            assert args.num_virtual_stages_per_pipeline_rank == 2
            for v in range(2):
                m = state[f"model{v}"]
                layers = global_layers[s, v]
                local = {int(k.split(".")[2]) for k in m if k.startswith("decoder.layers.")}
                assert local == set(range(len(layers))), (t, s, v)
                for j, g in enumerate(layers):
                    down = hf[f"model.layers.{g}.mlp.down_proj.weight"]  # row parallel
                    fc2 = m[f"decoder.layers.{j}.mlp.linear_fc2.weight"]
                    assert torch.equal(fc2, down[:, 12 * t : 12 * t + 12]), (t, s, v, j)
                others = sorted(k for k in m if not k.startswith("decoder.layers."))
                want = {
                    (0, 0): ["embedding.word_embeddings.weight"],
                    (1, 1): ["decoder.final_layernorm.weight", "output_layer.weight"],
                }.get((s, v), [])
                assert others == want, (t, s, v)
    # Found from the files alone (no virtual or first/last args); contradicting args refused.
    for file in it.glob("*/model_optim_rng.pt"):
        state = load_pt(file, mmap=False)
        for key in ("virtual_pipeline_model_parallel_size", "num_virtual_stages_per_pipeline_rank",
                    "decoder_first_pipeline_num_layers", "num_layers"):  # fmt: skip
            vars(state["args"]).pop(key)
        torch.save(state, file)
    ckpt = LegacyCheckpoint(root)
    names = [n for n, _ in ckpt.iter_tensors()]
    assert ckpt.stage_layers == pipeline_chunks(8, 2, virtual=2, first=2)
    assert names.index("decoder.layers.3.mlp.linear_fc2.weight") < names.index(
        "decoder.layers.4.mlp.linear_fc2.weight"
    )  # layer order: chunk 0 of every rank, then chunk 1
    file = it / "mp_rank_00_000/model_optim_rng.pt"
    state = load_pt(file, mmap=False)
    state["args"].virtual_pipeline_model_parallel_size = None
    torch.save(state, file)
    with pytest.raises(ValueError, match="args say 1 virtual pipeline stage"):
        LegacyCheckpoint(root)
    del state["args"].virtual_pipeline_model_parallel_size
    torch.save(state, file)
    file = it / "mp_rank_01_001/model_optim_rng.pt"
    state = load_pt(file, mmap=False)
    del state["model1"]
    torch.save(state, file)
    with pytest.raises(ValueError, match=re.escape("holds ['model0'], not 'model1'")):
        list(LegacyCheckpoint(root).iter_tensors())


def test_torch_dist_keys_do_not_depend_on_virtual_stages(hf_dirs, tmp_path):
    """Megatron-Core's sharded keys carry global layer offsets: the DCP metadata (keys, global
    shapes, chunks) is the same with and without virtual stages, for stacked keys (a dense
    model) and per-layer keys (dense and MoE layers mixed); only the data file a layer's chunks
    are stored in changes (layer 2 of 4 on pipeline rank 0 with 2 chunks per rank, on rank 1
    without)."""
    from torch.distributed.checkpoint import FileSystemReader

    qkv = re.compile(r"^decoder\.layers\.(?:(\d+)\.)?self_attention\.linear_qkv\.weight$")
    for family, ep in (("llama8", 1), ("qwen3_moe4", 2)):
        metadata = {}
        for vp in (1, 2):
            root = hf_to_megatron(
                hf_dirs[family], tmp_path / f"{family}-vp{vp}", tensor_parallel=2,
                pipeline_parallel=2, virtual_pipeline=vp, expert_parallel=ep,
            )  # fmt: skip
            metadata[vp] = FileSystemReader(root / "iter_0000000").read_metadata()
        chunks = {
            vp: {
                k: (tuple(v.size), sorted((tuple(c.offsets), tuple(c.sizes)) for c in v.chunks))
                for k, v in md.state_dict_metadata.items()
            }
            for vp, md in metadata.items()
        }
        assert chunks[1] == chunks[2], family
        files = {}  # vp -> layer -> data file "__{pipeline rank x EP + expert rank}_0"
        for vp, md in metadata.items():
            for index, data in md.storage_data.items():
                if (match := qkv.match(index.fqn)) is not None:
                    layer = int(match.group(1) or index.offset[0])
                    files.setdefault(vp, {})[layer] = data.relative_path
        n = 8 if family == "llama8" else 4
        rank1, per_rank_chunk = f"__{ep}_0.distcp", n // 4
        assert files[1] == {i: "__0_0.distcp" if i < n // 2 else rank1 for i in range(n)}, family
        assert files[2] == {
            i: "__0_0.distcp" if (i // per_rank_chunk) % 2 == 0 else rank1 for i in range(n)
        }, family


def test_forge_convert_virtual_pipeline_stages_and_layouts(hf_dirs, tmp_path, capsys):
    from forge_ckpt.cli import main

    src = str(hf_dirs["llama8"])
    for tag, extra in (
        ("vp", ["--virtual-pipeline-stages", "2", "--format", "legacy"]),
        ("layout", ["--pipeline-layout", "Et*3|t|tt|ttL"]),
    ):
        mc, back = tmp_path / f"mc-{tag}", tmp_path / f"back-{tag}"
        argv = ["hf-to-megatron", src, str(mc), "--tp", "2", "--pp", "2", *extra]
        assert main([*argv, "--dry-run"]) == 0
        assert ("vp=2" if tag == "vp" else "layout='Et*3|t|tt|ttL'") in capsys.readouterr().out
        assert main([*argv, "--quiet"]) == 0
        assert main(["hf-to-megatron", src, str(mc), "--check"]) == 0
        assert main(["megatron-to-hf", str(mc), str(back), "--dry-run"]) == 0
        assert "vp=2" in capsys.readouterr().out
        assert main(["megatron-to-hf", str(mc), str(back), "--quiet"]) == 0
        _assert_round_trip(hf_dirs["llama8"], mc, tmp_path / f"hf-{tag}", tag)
    bad = ["hf-to-megatron", src, str(tmp_path / "bad"), "--pp", "2", "--quiet"]
    assert main([*bad, "--virtual-pipeline-stages", "3"]) == 2
    assert "4 layers, which do not split into 3 virtual stages" in capsys.readouterr().err
    assert main([*bad, "--pipeline-layout", "Et|ttt|tt|ttmL"]) == 2
    assert "places 1 multi-token prediction layer(s) ('m'); the checkpoint has 0" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
def test_deepseek_mtp_with_a_layout_and_an_empty_chunk(mtp_dir, tmp_path, fmt):
    """DeepSeek-V3 (2 layers + 1 MTP layer) as ``Et|t||mL``: chunk 2 (rank 0's second virtual
    stage) holds nothing, the last chunk only the MTP layer and the head."""
    mc = hf_to_megatron(
        mtp_dir, tmp_path / "mc", pipeline_parallel=2, pipeline_layout="Et|t||mL", format=fmt,
        expert_parallel=2,
    )  # fmt: skip
    _assert_round_trip(mtp_dir, mc, tmp_path / "hf", fmt)
    if fmt == "legacy":
        it = mc / "iter_0000000"
        rank0 = load_pt(it / "mp_rank_00_000_001/model_optim_rng.pt")
        assert rank0["model1"] == {}
        assert rank0["args"].pipeline_model_parallel_layout == "Et|t||mL"
        last = load_pt(it / "mp_rank_00_001_001/model_optim_rng.pt")["model1"]
        assert not any(k.startswith("decoder.layers.") for k in last)
        assert "mtp.layers.0.eh_proj.weight" in last
        assert "output_layer.weight" in last
