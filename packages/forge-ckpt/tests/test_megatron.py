"""Megatron-Core formats: HF -> Megatron -> HF bit-exact for every family, at TP1/PP1 and TP2/PP2,
legacy and torch_dist, and the Megatron tensors checked against layouts computed here by hand."""

from __future__ import annotations

import argparse
import json
import pathlib

import pytest
import torch
from safetensors.torch import load_file

from forge_ckpt.megatron import (
    get_megatron_family,
    hf_to_megatron,
    list_megatron_families,
    load_pt,
    megatron_to_hf,
    merge_tp,
    split_tp,
)

_COMMON = {
    "vocab_size": 61, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2,
}  # fmt: skip
_MOE = {"moe_intermediate_size": 4, "num_experts_per_tok": 2}
CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {**_MOE, "num_experts": 4, "mlp_only_layers": [0]}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {**_MOE, "num_experts": 4, "decoder_sparse_step": 2, "shared_expert_intermediate_size": 6}),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", {
        **_MOE, "num_key_value_heads": 4, "n_routed_experts": 4, "n_shared_experts": 1, "n_group": 2,
        "topk_group": 1, "first_k_dense_replace": 1, "q_lora_rank": 6, "kv_lora_rank": 6,
        "qk_nope_head_dim": 4, "qk_rope_head_dim": 2, "v_head_dim": 3,
    }),
}  # fmt: skip


def test_every_family_has_a_case():
    import importlib.util

    from forge_ckpt.mapping.families import BUILTIN_MAPPINGS

    file = pathlib.Path(__file__).with_name("test_megatron_vlm.py")
    spec = importlib.util.spec_from_file_location("forge_ckpt_tests_test_megatron_vlm", file)
    vlm_tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vlm_tests)
    # The vision-language families (LLaVAModel) are tested in test_megatron_vlm.py; Qwen2.5-VL
    # has no Megatron-Core vision module and is refused there.
    assert sorted([*CASES, *vlm_tests.SPLITS]) == list_megatron_families()
    with pytest.raises(ValueError, match=r"no module for Qwen2\.5-VL's vision tower"):
        get_megatron_family("qwen2_5_vl")
    # Built-in families only: other tests register toy mappings in the same process.
    lacking = sorted(set(BUILTIN_MAPPINGS) - set(list_megatron_families()))
    assert not lacking, f"forge_ckpt mappings without a Megatron mapping: {lacking}"


def save_hf_models(tmp_path_factory, cases: dict) -> dict[str, pathlib.Path]:
    """Name -> folder of a small random transformers model per case (``(config class, model
    class, config overrides)``), saved in 8 KB safetensors shards."""
    import transformers

    dirs = {}
    for name, (config_cls, model_cls, extra) in cases.items():
        torch.manual_seed(0)
        config = getattr(transformers, config_cls)(**{**_COMMON, **extra})
        out = tmp_path_factory.mktemp(name)
        getattr(transformers, model_cls)(config).save_pretrained(out, max_shard_size="8KB")
        dirs[name] = out
    return dirs


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    return save_hf_models(tmp_path_factory, CASES)


def _tensors(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


SPLITS = [(1, 1, True), (2, 2, True), (2, 2, False)]  # (tp, pp, Transformer Engine spec)


@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
@pytest.mark.parametrize("family", sorted(CASES))
def test_hf_megatron_hf_round_trip_is_bit_exact(hf_dirs, tmp_path, family, fmt):
    original = _tensors(hf_dirs[family])
    for tp, pp, te in SPLITS:
        grouped = family.endswith("moe") and not te
        tag = f"{tp}x{pp}-{te}"
        mc = hf_to_megatron(
            hf_dirs[family], tmp_path / f"mc-{tag}", tensor_parallel=tp, pipeline_parallel=pp,
            format=fmt, te_spec=te, grouped_gemm=grouped,
        )  # fmt: skip
        back = _tensors(megatron_to_hf(mc, tmp_path / f"hf-{tag}", max_shard_size="6KB"))
        assert sorted(back) == sorted(original), tag
        for name, t in original.items():
            assert back[name].dtype == t.dtype, (tag, name)
            assert torch.equal(back[name], t), (tag, name)


# --------------------------------------------------------------------------------------------
# Layouts, computed independently
# --------------------------------------------------------------------------------------------


def _by_hand_qkv(q, k, v, heads, groups, d):
    """Megatron's [q-group, k, v] interleave, one group at a time."""
    rows = []
    per = heads // groups
    for g in range(groups):
        rows += [q[(g * per + h) * d : (g * per + h + 1) * d] for h in range(per)]
        rows += [k[g * d : (g + 1) * d], v[g * d : (g + 1) * d]]
    return torch.cat(rows)


def test_legacy_tp2_pp2_layout(hf_dirs, tmp_path):
    hf = _tensors(hf_dirs["qwen2"])  # tied embeddings, qkv biases, 2 groups of 2 heads
    root = hf_to_megatron(
        hf_dirs["qwen2"], tmp_path / "mc", tensor_parallel=2, pipeline_parallel=2, format="legacy",
        iteration=100,
    )  # fmt: skip
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "100"
    files = sorted(p.parent.name for p in root.glob("iter_0000100/*/model_optim_rng.pt"))
    assert files == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]

    def load(tp, pp):
        return load_pt(root / f"iter_0000100/mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt")

    s00, s10, s01, s11 = load(0, 0), load(1, 0), load(0, 1), load(1, 1)
    assert isinstance(s00["args"], argparse.Namespace)
    assert s00["checkpoint_version"] == 3.0
    assert s00["iteration"] == 100
    assert (s00["args"].tensor_model_parallel_size, s00["args"].pipeline_model_parallel_size) == (
        2,
        2,
    )
    assert s00["args"].padded_vocab_size == 256  # 61 -> multiple of 128 x TP 2
    a = "model.layers.{}.self_attn.{}_proj.{}"
    # Stage 1 holds global layer 1 as its local layer 0.
    for stage, ranks, layer in ((0, (s00, s10), 0), (1, (s01, s11), 1)):
        q, k, v = (hf[a.format(layer, p, "weight")] for p in "qkv")
        fused = _by_hand_qkv(q, k, v, heads=4, groups=2, d=4)
        qb, kb, vb = (hf[a.format(layer, p, "bias")] for p in "qkv")
        fused_b = _by_hand_qkv(qb, kb, vb, heads=4, groups=2, d=4)
        gate = hf[f"model.layers.{layer}.mlp.gate_proj.weight"]
        up = hf[f"model.layers.{layer}.mlp.up_proj.weight"]
        o = hf[f"model.layers.{layer}.self_attn.o_proj.weight"]
        for r, state in enumerate(ranks):
            m = state["model"]
            assert not any(n.startswith("decoder.layers.1.") for n in m), stage
            t = "decoder.layers.0.self_attention.linear_qkv."
            assert torch.equal(m[t + "weight"], fused[r * 16 : (r + 1) * 16])  # group r
            assert torch.equal(m[t + "bias"], fused_b[r * 16 : (r + 1) * 16])
            assert torch.equal(
                m[t + "layer_norm_weight"], hf[f"model.layers.{layer}.input_layernorm.weight"]
            )
            fc1 = m["decoder.layers.0.mlp.linear_fc1.weight"]
            assert torch.equal(
                fc1, torch.cat([gate[r * 12 : (r + 1) * 12], up[r * 12 : (r + 1) * 12]])
            )
            assert torch.equal(
                m["decoder.layers.0.self_attention.linear_proj.weight"], o[:, r * 8 : (r + 1) * 8]
            )
    emb = torch.cat(
        [
            s00["model"]["embedding.word_embeddings.weight"],
            s10["model"]["embedding.word_embeddings.weight"],
        ]
    )
    assert emb.shape == (256, 16)
    assert torch.equal(emb[:61], hf["model.embed_tokens.weight"])
    assert not emb[61:].any()
    # Tied embeddings: the last stage keeps Megatron's copy of the embedding as output_layer.
    assert torch.equal(
        s11["model"]["output_layer.weight"], s10["model"]["embedding.word_embeddings.weight"]
    )
    assert "decoder.final_layernorm.weight" in s01["model"]
    assert "embedding.word_embeddings.weight" not in s01["model"]


def test_torch_dist_layout(hf_dirs, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    hf = _tensors(hf_dirs["qwen3_moe"])  # layer 0 dense, layer 1 MoE with 4 experts
    root = hf_to_megatron(
        hf_dirs["qwen3_moe"], tmp_path / "mc", tensor_parallel=2, pipeline_parallel=2
    )
    it = root / "iter_0000000"
    assert json.loads((it / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    assert sorted(p.name for p in it.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    md = FileSystemReader(it).read_metadata().state_dict_metadata
    # Dense and MoE layers mixed: Megatron-Core's non-homogeneous layers, one key per layer.
    qkv = md["decoder.layers.1.self_attention.linear_qkv.weight"]
    assert tuple(qkv.size) == (32, 16)
    assert len(qkv.chunks) == 2
    assert not any(k.startswith("decoder.layers.self_attention") for k in md)
    fc1 = md["decoder.layers.1.mlp.experts.experts.linear_fc1.weight"]
    assert tuple(fc1.size) == (4, 8, 16)  # [experts, 2 * moe_ffn, hidden]
    assert len(fc1.chunks) == 4 * 2 * 2  # experts x TP x (gate, up)
    assert "decoder.layers.0.mlp.linear_fc1.weight" in md
    assert "decoder.layers.1.mlp.linear_fc1.weight" not in md
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in md  # TE: fused on dense layers
    assert "decoder.layers.1.pre_mlp_layernorm.weight" in md  # and separate on MoE layers
    state = {
        "decoder.layers.1.self_attention.linear_qkv.weight": torch.zeros(32, 16),
        "decoder.layers.1.mlp.experts.experts.linear_fc2.weight": torch.zeros(4, 16, 4),
    }
    dcp.load(state, storage_reader=FileSystemReader(it), no_dist=True)
    a = "model.layers.1.self_attn.{}_proj.weight"
    want = _by_hand_qkv(*(hf[a.format(p)] for p in "qkv"), heads=4, groups=2, d=4)
    assert torch.equal(state["decoder.layers.1.self_attention.linear_qkv.weight"], want)
    assert torch.equal(
        state["decoder.layers.1.mlp.experts.experts.linear_fc2.weight"][3],
        hf["model.layers.1.mlp.experts.3.down_proj.weight"],
    )
    common = load_pt(it / "common.pt")
    assert common["checkpoint_version"] == 3.0
    assert common["args"].num_experts == 4
    assert common["args"].moe_layer_freq == [0, 1]
    # A homogeneous model keeps Megatron-Core's stacked keys with a leading layer axis.
    dense = hf_to_megatron(hf_dirs["qwen3"], tmp_path / "dense", tensor_parallel=2)
    md = FileSystemReader(dense / "iter_0000000").read_metadata().state_dict_metadata
    assert tuple(md["decoder.layers.self_attention.linear_qkv.weight"].size) == (2, 64, 16)
    assert not any(k.startswith("decoder.layers.0.") for k in md)


def test_deepseek_v3_mla_names(hf_dirs, tmp_path):
    hf = _tensors(hf_dirs["deepseek_v3"])
    for te, norm in ((True, "linear_kv_up_proj.layer_norm_weight"), (False, "kv_layernorm.weight")):
        root = hf_to_megatron(
            hf_dirs["deepseek_v3"], tmp_path / f"mc{te}", format="legacy", te_spec=te
        )
        m = load_pt(root / "iter_0000000/mp_rank_00/model_optim_rng.pt")["model"]
        a = "decoder.layers.1.self_attention."
        assert torch.equal(
            m[a + "linear_kv_down_proj.weight"],
            hf["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"],
        )
        assert torch.equal(m[a + norm], hf["model.layers.1.self_attn.kv_a_layernorm.weight"])
        assert torch.equal(
            m["decoder.layers.1.mlp.router.expert_bias"],
            hf["model.layers.1.mlp.gate.e_score_correction_bias"],
        )
        assert "decoder.layers.1.mlp.shared_experts.linear_fc1.weight" in m
        assert "decoder.layers.0.mlp.linear_fc1.weight" in m
        assert "decoder.layers.0.mlp.router.weight" not in m


def test_tensor_parallel_split_merge_is_exact():
    full = torch.arange(8 * 6.0).reshape(8, 6)
    for name in ("decoder.layers.0.mlp.linear_fc1.weight", "decoder.layers.0.mlp.linear_fc2.weight",
                 "decoder.layers.0.self_attention.linear_qkv.weight", "decoder.final_layernorm.weight"):  # fmt: skip
        assert torch.equal(merge_tp(name, split_tp(name, full, 2)), full)
    gate_up = split_tp("decoder.layers.0.mlp.linear_fc1.weight", full, 2)
    assert torch.equal(gate_up[1], torch.cat([full[2:4], full[6:8]]))  # [gate_1; up_1]
    with pytest.raises(ValueError, match="replicated"):
        merge_tp("decoder.final_layernorm.weight", [full, full + 1])
    with pytest.raises(ValueError, match="no tensor-parallel rule"):
        split_tp("decoder.layers.0.mystery.weight", full, 2)


def test_errors_are_clear(hf_dirs, tmp_path):
    with pytest.raises(ValueError, match="pipeline stages"):
        hf_to_megatron(hf_dirs["llama"], tmp_path / "a", pipeline_parallel=3)
    with pytest.raises(ValueError, match="tensor-parallel"):
        hf_to_megatron(hf_dirs["llama"], tmp_path / "b", tensor_parallel=3)
    # 4 heads in 2 query groups: tp=4 splits the groups (every tensor still divides by 4).
    for fmt in ("legacy", "torch_dist"):
        with pytest.raises(ValueError, match=r"num_attention_heads=4 .*=2 .*\[1, 2\]"):
            hf_to_megatron(hf_dirs["llama"], tmp_path / f"g{fmt}", tensor_parallel=4, format=fmt)
    with pytest.raises(ValueError, match=r"num_attention_heads=4 .*=4 .*\[1, 2, 4\]"):
        hf_to_megatron(hf_dirs["deepseek_v3"], tmp_path / "mla", tensor_parallel=8)
    assert not any((tmp_path / name).exists() for name in ("glegacy", "gtorch_dist", "mla"))
    with pytest.raises(KeyError, match="no Megatron mapping for family"):
        get_megatron_family("gpt2")
    with pytest.raises(ValueError, match="supported model types"):
        get_megatron_family({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="does not match the megatron-qwen3"):
        hf_to_megatron(hf_dirs["llama"], tmp_path / "c", family="qwen3")


class _Exec:
    """Unpickles into a call of ``exec``: writes ``marker`` if the code runs."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


class _Hop:
    """A function from torch.distributed.checkpoint itself, not a metadata class: it unpickles
    another file with ``torch.load(weights_only=False)`` (a module-prefix allow-list admits it)."""

    def __init__(self, payload: pathlib.Path, out: pathlib.Path) -> None:
        self.payload, self.out = payload, out

    def __reduce__(self):
        from torch.distributed.checkpoint.format_utils import torch_save_to_dcp

        return (torch_save_to_dcp, (str(self.payload), str(self.out)))


def test_torch_dist_metadata_is_read_without_running_code(hf_dirs, tmp_path):
    import pickle

    from forge_ckpt.megatron.dist import DistCheckpoint

    root = hf_to_megatron(hf_dirs["qwen3"], tmp_path / "mc", tensor_parallel=2)
    metadata = root / "iter_0000000" / ".metadata"
    assert set(DistCheckpoint(root).keys())  # the genuine file reads
    marker = tmp_path / "ran"
    payload = tmp_path / "payload.pt"
    payload.write_bytes(pickle.dumps(_Exec(marker)))
    cases = [
        (pickle.dumps(_Exec(marker)), r"refusing to load builtins\.exec"),
        (
            pickle.dumps(_Hop(payload, tmp_path / "hop")),
            r"refusing to load torch\.distributed\.checkpoint\.format_utils\.torch_save_to_dcp",
        ),
        (pickle.dumps({"state_dict_metadata": {}}), "holds a dict, not DCP Metadata"),
        (metadata.read_bytes()[:-40], "not a valid DCP metadata file"),  # truncated
    ]
    for data, message in cases:
        metadata.write_bytes(data)
        with pytest.raises(ValueError, match=message) as err:
            DistCheckpoint(root)
        assert str(metadata) in str(err.value)
        with pytest.raises(ValueError, match=message):
            megatron_to_hf(root, tmp_path / "hf")
        assert not marker.exists()
    assert not (tmp_path / "hf").exists()


def test_unsafe_pickles_are_refused_with_a_clear_error(tmp_path):
    file = tmp_path / "model_optim_rng.pt"
    args = argparse.Namespace(num_layers=2, save=pathlib.PurePosixPath("/ckpt"))
    torch.save({"model": {"w": torch.ones(2)}, "args": args}, file)
    with pytest.raises(ValueError, match=r"PurePosixPath.*trusted_globals"):
        load_pt(file)
    state = load_pt(file, trusted_globals=["pathlib.PurePosixPath"])
    assert state["args"].num_layers == 2
    torch.save({"model": {}, "args": argparse.Namespace(num_layers=2)}, file)
    assert load_pt(file)["args"].num_layers == 2  # Namespace alone is allowed
