"""A Hugging Face checkpoint loads straight into parallelized forge models, each rank reading
only its share.

A tiny Llama (and a tiny Qwen3-MoE) written by ``forge_models.save_pretrained`` in several
safetensors shards is loaded on 2 gloo ranks into (a) an FSDP2 model, (b) a tensor-parallel
model (TP2, packed ``gate_up_proj`` as ``_StridedShard``), (c) a 2-stage pipeline (stage
modules cut from a meta-device model, then allocated), and (d) an expert-parallel MoE (ep=2).
Gathered back, every tensor equals the single-process ``from_pretrained`` load bit for bit, and
the bytes each rank's slice reader returned are its share: exactly the bytes of the local
shards it holds, and for FSDP half the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import forge_models
from forge_ckpt import CheckpointMismatchError, HFCheckpoint
from forge_models import registry

SHARD_SIZE = 60_000  # bytes: several safetensors files, tensors of one layer across them


def _checkpoint_bytes(path: str) -> int:
    ckpt = HFCheckpoint(path)
    with ckpt.slice_reader() as reader:
        for name in ckpt.names():
            reader.read(name)
        return reader.bytes_read


def _config(path: str):
    hf_config = HFCheckpoint(path).config
    return registry.family_for_hf_config(hf_config).config_from_hf(hf_config)


def _nan_filled(model: torch.nn.Module) -> torch.nn.Module:
    """Allocate a meta-device (possibly parallelized) model, every element NaN: a tensor the
    loader leaves unfilled cannot pass the bitwise comparison."""
    model.to_empty(device="cpu")
    with torch.no_grad():
        for t in model.state_dict().values():
            (t.to_local() if hasattr(t, "to_local") else t).fill_(float("nan"))
    return model


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _mismatches(model: torch.nn.Module, ref: dict[str, torch.Tensor]) -> list[str]:
    state = {n: _full(t) for n, t in model.state_dict().items()}
    assert state.keys() == ref.keys(), sorted(state.keys() ^ ref.keys())
    return [n for n in ref if not torch.equal(state[n], ref[n])]


def _load(model: torch.nn.Module, path: str, **kwargs) -> dict:
    from forge_models.sharded_load import load_hf_shards

    report = load_hf_shards(model, path, **kwargs)
    local = sum(
        (t.to_local() if hasattr(t, "to_local") else t).numel() * 4
        for t in model.state_dict().values()
    )
    return {"report": report, "local_bytes": local}


def _dense_job(path: str) -> dict:
    import forge_parallel
    from forge_core import ParallelDims
    from forge_parallel.pipeline import PipelineConfig, split_stages

    ref = forge_models.from_pretrained(path).state_dict()
    config = _config(path)
    family = registry.get_family(config.family)
    world, rank = dist.get_world_size(), dist.get_rank()
    out: dict = {}

    model = registry.build_model(config, device="meta")
    forge_parallel.parallelize(model, ParallelDims(world_size=world, dp_shard=world))
    out["fsdp"] = _load(_nan_filled(model), path)
    out["fsdp"]["bad"] = _mismatches(model, ref)
    model = forge_models.from_pretrained(
        path, parallelize=lambda m: forge_parallel.parallelize(m, ParallelDims(world_size=world))
    )
    out["fsdp"]["bad_from_pretrained"] = _mismatches(model, ref)
    out["fsdp"]["sharded"] = type(model.norm.weight.placements[0]).__name__

    model = registry.build_model(config, device="meta")
    forge_parallel.parallelize(
        model,
        ParallelDims(world_size=world, tp=world, dp_shard=1),
        plan=family.parallel_plan(sequence_parallel=False),
        data_parallel=None,
    )
    out["tp"] = _load(_nan_filled(model), path)
    out["tp"]["bad"] = _mismatches(model, ref)
    gate_up = model.layers[0].mlp.gate_up_proj.weight
    out["tp"]["packed"] = type(gate_up.placements[0]).__name__

    model = registry.build_model(config, device="meta")
    _, (stage,), _, bounds = split_stages(
        model, pp=world, pp_rank=rank, config=PipelineConfig(microbatches=2)
    )
    out["pp"] = _load(_nan_filled(stage), path, config=config)
    state = stage.state_dict()
    out["pp"]["bad"] = [n for n, t in state.items() if not torch.equal(t, ref[n])]
    out["pp"]["names"] = sorted(state)
    out["pp"]["bounds"] = bounds
    # The public entry point routes a stage (config given) to the same loader.
    forge_models.load_hf_weights(_nan_filled(stage), path, config=config)
    out["pp"]["bad_public"] = [
        n for n, t in stage.state_dict().items() if not torch.equal(t, ref[n])
    ]
    return out


def _ep_job(path: str) -> dict:
    import forge_parallel
    from forge_core import ParallelDims
    from forge_parallel.expert_parallel import EPConfig

    ref = forge_models.from_pretrained(path).state_dict()
    config = _config(path)
    world = dist.get_world_size()
    model = registry.build_model(config, device="meta")
    forge_parallel.parallelize(
        model,
        ParallelDims(world_size=world, ep=world),
        expert_parallel=EPConfig(experts="layers.*.mlp.experts"),
    )
    _nan_filled(model)
    forge_models.load_hf_weights(model, path)  # the public entry point: DTensors -> sharded
    out = _load(_nan_filled(model), path)
    out["bad"] = _mismatches(model, ref)
    experts = model.layers[0].mlp.experts.gate_up_proj
    out["local_experts"] = experts.to_local().shape[0]
    return out


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = registry.build_model("llama-debug")
    path = tmp_path_factory.mktemp("hf") / "llama"
    forge_models.save_pretrained(model, path, max_shard_size=SHARD_SIZE)
    assert len(HFCheckpoint(path).files) > 3
    return str(path)


def test_fsdp_tp_and_pipeline_ranks_read_only_their_shards(dist_pool, llama_dir):
    total = _checkpoint_bytes(llama_dir)
    per_rank = dist_pool(2).run(_dense_job, llama_dir)
    for rank, out in enumerate(per_rank):
        for layout in ("fsdp", "tp", "pp"):
            assert out[layout]["bad"] == [], (rank, layout, out[layout]["bad"])
            report = out[layout]["report"]
            # Every tensor read box by box; the bytes read are exactly the local shards'.
            assert report.materialized == 0, (rank, layout, report)
            assert report.bytes_read == out[layout]["local_bytes"], (rank, layout, report)
        assert out["pp"]["bad_public"] == []
        assert out["fsdp"]["bad_from_pretrained"] == []
        # Contiguous shards go straight from the file into the parameters (preadv): all of
        # FSDP's row blocks and whole pipeline tensors; under TP the row-parallel column
        # blocks are strided in the file and go through the slice reader.
        for layout in ("fsdp", "pp"):
            report = out[layout]["report"]
            assert report.direct == report.tensors, (rank, layout, report)
        assert 0 < out["tp"]["report"].direct < out["tp"]["report"].tensors, out["tp"]
        assert out["fsdp"]["sharded"] == "Shard"
        assert out["tp"]["packed"] == "_StridedShard"  # the packed gate_up_proj layout
        # FSDP2 shards every tensor on dim 0 over the 2 ranks: each reads half.
        assert out["fsdp"]["report"].bytes_read * 2 == total, (rank, total)
        # TP: the projections and embeddings are split, only the norms are read by both.
        assert out["tp"]["report"].bytes_read < 0.52 * total, (rank, total)
    # The pipeline stages hold disjoint tensors that together make the whole model.
    stage0, stage1 = (set(out["pp"]["names"]) for out in per_rank)
    assert not stage0 & stage1
    assert "embed_tokens.weight" in stage0
    assert "lm_head.weight" in stage1
    assert sum(out["pp"]["report"].bytes_read for out in per_rank) == total
    assert per_rank[0]["pp"]["report"].skipped == len(stage1)


def test_expert_parallel_ranks_read_only_their_experts(dist_pool, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "moe"
    model = registry.build_model("qwen3-moe-debug", num_layers=2)
    forge_models.save_pretrained(model, path, max_shard_size=SHARD_SIZE)
    total = _checkpoint_bytes(str(path))
    expert_bytes = sum(t.numel() * 4 for n, t in model.state_dict().items() if ".mlp.experts." in n)
    for rank, out in enumerate(dist_pool(2).run(_ep_job, str(path))):
        assert out["bad"] == [], (rank, out["bad"])
        assert out["local_experts"] == 4  # 8 experts over 2 ranks
        report = out["report"]
        assert report.materialized == 0, report
        assert report.bytes_read == out["local_bytes"], report
        # Experts split by ep, dense tensors by FSDP over dp_shard: each rank reads half.
        assert report.bytes_read * 2 == total, (rank, report, total, expert_bytes)


def test_a_stage_needs_the_model_config_and_a_tensor_the_checkpoint_lacks_is_an_error(
    llama_dir, tmp_path
):
    from forge_models.sharded_load import load_hf_shards

    config = _config(llama_dir)
    model = registry.build_model(config)
    stage = torch.nn.Module()
    stage.layers = torch.nn.ModuleDict({"1": model.layers[1]})
    with pytest.raises(ValueError, match="pass config="):
        load_hf_shards(stage, llama_dir)
    report = load_hf_shards(stage, llama_dir, config=config)
    assert report.tensors == len(stage.state_dict())
    assert report.skipped > 0
    ref = forge_models.from_pretrained(llama_dir)
    assert torch.equal(stage.layers["1"].attn.q_proj.weight, ref.layers[1].attn.q_proj.weight)

    # A 3-layer model's extra layer is not in the 2-layer checkpoint: missing, named.
    bigger = registry.build_model(config.replace(num_layers=3))
    extra = torch.nn.Module()
    extra.layers = torch.nn.ModuleDict({"2": bigger.layers[2]})
    with pytest.raises(CheckpointMismatchError, match=r"layers\.2\.attn\.q_proj\.weight"):
        load_hf_shards(extra, llama_dir, config=config)


def test_local_index_follows_placements_without_communication():
    """The per-dim positions of FSDP / TP / packed / FSDP-over-TP shards, from placements."""
    from torch.distributed.tensor.placement_types import _StridedShard

    from forge_models.local_shards import _chunk

    positions = torch.arange(8)
    assert [p.tolist() for p in _chunk(positions, 3)] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert [p.tolist() for p in _chunk(torch.arange(2), 4)] == [[0], [1], [], []]
    # _StridedShard(0, split_factor=2) over 2 ranks: rank 1 holds [gate_1; up_1].
    pieces = _chunk(positions, _StridedShard(0, split_factor=2).split_factor)
    assert torch.cat([_chunk(p, 2)[1] for p in pieces]).tolist() == [2, 3, 6, 7]


@pytest.mark.parametrize(
    ("size", "pad", "materialized"),
    [
        ("qwen2-debug", 3, 0),  # tied embeddings, vocabulary padded 512 -> 513: zero row
        ("deepseek-v3-debug", 1, 2),  # MTP copies of embedding / head: checked, built whole
    ],
)
def test_padded_vocab_tied_head_and_checked_copies(tmp_path, size, pad, materialized):
    """Padding rows are zeros (not read), duplicate checkpoint tensors are materialized and
    checked, and a stage holding a tied ``lm_head`` without its embedding loads it."""
    from forge_models.sharded_load import load_hf_shards

    torch.manual_seed(0)
    forge_models.save_pretrained(registry.build_model(size), tmp_path / "ck")
    path = str(tmp_path / "ck")
    ref = forge_models.from_pretrained(path, vocab_pad_multiple=pad)
    model = _nan_filled(registry.build_model(ref.config, device="meta"))
    report = load_hf_shards(model, path)
    assert _mismatches(model, ref.state_dict()) == []
    assert report.materialized == materialized, report
    if ref.config.tie_word_embeddings:
        assert report.bytes_local - report.bytes_read == ref.config.hidden_size * 4  # 1 pad row
        head = torch.nn.Module()
        head.lm_head = torch.nn.Linear(
            ref.config.hidden_size, ref.config.padded_vocab_size, bias=False
        )
        load_hf_shards(head, path, config=ref.config)
        assert torch.equal(head.lm_head.weight, ref.lm_head.weight)


def test_path_is_a_path_or_str(llama_dir):
    """``load_hf_shards`` takes a folder as ``str`` / ``Path`` or an open checkpoint."""
    from forge_models.sharded_load import load_hf_shards

    model = registry.build_model("llama-debug")
    for where in (llama_dir, Path(llama_dir), HFCheckpoint(llama_dir)):
        assert load_hf_shards(model, where).tensors == len(model.state_dict())


def test_an_integer_tensor_for_a_float_weight_is_refused(tmp_path):
    """The sharded loader refuses an integer tensor where a float weight belongs, as
    ``from_pretrained`` does (a copy would silently turn its values into floats)."""
    from safetensors.torch import load_file, save_file

    from forge_models.sharded_load import load_hf_shards

    forge_models.save_pretrained(registry.build_model("llama-debug"), tmp_path)
    name = "model.layers.0.input_layernorm.weight"
    for file in tmp_path.glob("*.safetensors"):
        tensors = load_file(file)
        if name in tensors:
            tensors[name] = torch.ones_like(tensors[name], dtype=torch.int32)
            save_file(tensors, file, metadata={"format": "pt"})
    model = registry.build_model(_config(str(tmp_path)))
    with pytest.raises(CheckpointMismatchError, match=rf"{name}: I32"):
        load_hf_shards(model, tmp_path)
