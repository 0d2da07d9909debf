"""Single-process tiers: validation errors (no process group), recompute and compile on one
process, and placements / summaries at large simulated world sizes (fake process group)."""

from __future__ import annotations

import copy
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from forge_core import ParallelDims
from forge_core.testing import import_path
from forge_parallel import (
    CompileConfig,
    FSDPConfig,
    RecomputeConfig,
    TPPlan,
    ZeroOptimizer,
    parallelize,
    valid_tp_degrees,
)
from forge_parallel.tensor_parallel import validate_tp

tm = import_path(Path(__file__).with_name("tiny_models.py"), "forge_parallel_tests_tiny_models")


# -- validation: errors name the numbers (no process group needed) ------------------------


def _wide():
    """8 query and 8 key/value heads: valid tp degrees are the divisors of 8."""
    return tm.build_tiny(dim=64, n_heads=8, n_kv_heads=8, ffn=128, vocab=128)


def test_tp_degree_that_does_not_divide_heads_names_the_numbers():
    message = "tp=3 does not divide num_kv_heads=8 of layers.0.attn; valid tp degrees: 1, 2, 4, 8"
    plan = TPPlan(
        styles={"layers.*.attn.q_proj": "colwise"},
        attributes={"layers.*.attn": {"num_kv_heads": "divide"}},
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        parallelize(_wide(), ParallelDims(world_size=6, tp=3), plan=plan)
    assert valid_tp_degrees(_wide(), tm.tiny_plan()) == [1, 2, 4, 8]
    # 4 query / 2 key-value heads: tp=4 fails on the key/value heads.
    with pytest.raises(ValueError, match=re.escape("tp=4 does not divide num_kv_heads=2")):
        parallelize(tm.build_tiny(), ParallelDims(world_size=4, tp=4), plan=tm.tiny_plan())


@pytest.mark.parametrize(
    ("dims", "kwargs", "message"),
    [
        (
            {"tp": 2},
            {},
            "tp=2 needs a tensor-parallel plan, and forge-parallel makes none on its own for a "
            "model it does not know (TinyLlama: a transformers model or one you wrote): pass "
            "parallelize(..., plan=TPPlan(styles={'model.layers.*.self_attn.q_proj': 'colwise', "
            "...})); forge-parallel's README, section 'Tensor and sequence parallelism from a "
            "plan'",
        ),
        ({"ep": 2}, {}, "ep=2 needs expert_parallel=EPConfig(experts="),
        (
            {"cp": 2},
            {"data_parallel": "zero1"},
            "cp=2: the context-parallel ranks hold partial gradients",
        ),
        (
            {"dp_replicate": 2},
            {"data_parallel": "fsdp"},
            "data_parallel='fsdp' shards over dp_shard x cp = 4 ranks, but dp_replicate=2: use "
            "data_parallel='hsdp'",
        ),
        (
            {},
            {"data_parallel": "hsdp"},
            "data_parallel='hsdp' needs dp_replicate > 1 and dp_shard x cp > 1, got "
            "dp_replicate=1 and dp_shard x cp=8; use 'fsdp'",
        ),
        (
            {"tp": 2},
            {"data_parallel": "zero1", "plan": "tiny"},
            "data_parallel='zero1' with tp=2 is not supported",
        ),
        ({}, {"data_parallel": "zero3"}, "unknown data_parallel='zero3'"),
        (
            {},
            {"data_parallel": "zero2", "fsdp": FSDPConfig()},
            "fsdp=FSDPConfig(...) configures data_parallel 'fsdp', 'hsdp' or 'ddp', but "
            "data_parallel resolved to 'zero2'",
        ),
        (
            {"tp": 2},
            {"plan": "tiny_sp_without_gather"},
            "with sequence_parallel=True, layers.0.attn.q_proj (colwise) would receive a "
            "sequence-sharded input",
        ),
    ],
)
def test_invalid_combinations_raise_before_touching_the_model(dims, kwargs, message):
    kwargs = dict(kwargs)
    if kwargs.get("plan") == "tiny":
        kwargs["plan"] = tm.tiny_plan()
    elif kwargs.get("plan") == "tiny_sp_without_gather":
        styles = {k: v for k, v in tm.tiny_plan().styles.items() if v != "block_input"}
        kwargs["plan"] = TPPlan(styles=styles, sequence_parallel=True)
    model = tm.build_tiny()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=re.escape(message)):
        parallelize(model, ParallelDims(world_size=8, **dims), **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_plan_errors():
    model = tm.build_tiny()
    with pytest.raises(ValueError, match="unknown tensor-parallel style 'columnwise'"):
        TPPlan(styles={"lm_head": "columnwise"})
    with pytest.raises(ValueError, match=re.escape("pattern 'layer.*.attn' matches no module")):
        parallelize(model, ParallelDims(world_size=2, tp=2), plan={"layer.*.attn": "colwise"})
    with pytest.raises(ValueError, match=re.escape("matched by both 'layers.*.attn.q_proj' and")):
        parallelize(
            model,
            ParallelDims(world_size=2, tp=2),
            plan={"layers.*.attn.q_proj": "colwise", "layers.0.attn.*": "rowwise"},
        )
    with pytest.raises(
        ValueError, match=re.escape("style 'colwise' needs an nn.Linear, but embed is Embedding")
    ):
        parallelize(model, ParallelDims(world_size=2, tp=2), plan={"embed": "colwise"})
    # A per-head norm inside a 'block_input' attention block without a style of its own
    # would train on one rank's heads' partial gradient (Qwen3's q_norm / k_norm).
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.q_norm\.weight sits inside the"):
        validate_tp(tm.build_tiny_qk_norm(), tm.tiny_plan(sequence_parallel=True), 2)
    validate_tp(
        tm.build_tiny_qk_norm(),
        tm.tiny_plan(sequence_parallel=True, qk_norm="replicate_partial"),
        2,
    )
    with pytest.raises(ValueError, match="has no attribute 'n_heads'"):
        parallelize(
            model,
            ParallelDims(world_size=2, tp=2),
            plan=TPPlan(styles={}, attributes={"layers.*.attn": {"n_heads": "divide"}}),
        )


def test_plain_colwise_on_a_fused_projection_is_refused():
    """``colwise`` on ``gate_up_proj`` would give rank 0 all of gate and rank 1 all of up."""
    from torch.distributed.tensor.parallel import ColwiseParallel

    model = tm.build_tiny()
    styles = dict(tm.tiny_plan().styles)
    with pytest.raises(
        ValueError,
        match=r"layers\.0\.mlp\.gate_up_proj is named like a fused projection \('gate_up_proj'"
        r".*'colwise_packed:N'.*'colwise_packed:a,b,c'.*ColwiseParallel\(\)",
    ):
        validate_tp(model, {**styles, "layers.*.mlp.gate_up_proj": "colwise"}, 2)
    # a LoRA wrapper's base as well
    wrapped = tm.build_tiny()
    for layer in wrapped.layers:
        wrapper = torch.nn.Module()
        wrapper.base = layer.mlp.gate_up_proj
        layer.mlp.gate_up_proj = wrapper
    with pytest.raises(ValueError, match=r"'adapter:colwise' would give each tp rank whole"):
        validate_tp(wrapped, {**styles, "layers.*.mlp.gate_up_proj": "adapter:colwise"}, 2)
    # the explicit way out for a module that only carries such a name
    validate_tp(model, {**styles, "layers.*.mlp.gate_up_proj": ColwiseParallel()}, 2)


def test_packed_parts_in_proportions():
    model = tm.build_tiny()  # gate_up_proj: out_features 128
    styles = dict(tm.tiny_plan().styles)
    # 31:1 -> parts of 124 and 4 features; every part must split over tp
    assert valid_tp_degrees(model, styles) == [1, 2, 4, 8, 16]
    plan = {**styles, "layers.*.mlp.gate_up_proj": "colwise_packed:31,1"}
    assert valid_tp_degrees(model, plan) == [1, 2, 4]
    TPPlan(styles={"lm_head": "colwise_packed:1,1,1"})
    validate_tp(model, {**styles, "layers.*.mlp.gate_up_proj": "colwise_packed:96,32"}, 2)
    with pytest.raises(ValueError, match=r"proportions 3:2 of 'colwise_packed:3,2' \(their sum 5"):
        validate_tp(model, {**styles, "layers.*.mlp.gate_up_proj": "colwise_packed:3,2"}, 2)
    with pytest.raises(ValueError, match="unknown tensor-parallel style 'colwise_packed:2,0'"):
        TPPlan(styles={"lm_head": "colwise_packed:2,0"})
    with pytest.raises(
        ValueError, match="unknown tensor-parallel style 'adapter:colwise_packed:2,1'"
    ):
        TPPlan(styles={"lm_head": "adapter:colwise_packed:2,1"})


def test_config_errors():
    with pytest.raises(ValueError, match="recompute mode must be 'full' or 'selective'"):
        RecomputeConfig(mode="some")
    with pytest.raises(ValueError, match="unknown selective recompute preset 'mlp'"):
        RecomputeConfig(mode="selective", ops="mlp")
    with pytest.raises(ValueError, match="every=2 applies to full recompute only"):
        RecomputeConfig(mode="selective", every=2)
    with pytest.raises(
        ValueError, match=re.escape("param_dtype must be a floating-point torch.dtype")
    ):
        FSDPConfig(param_dtype=torch.int8)
    with pytest.raises(
        ValueError, match="ZeroOptimizer implements ZeRO stages 1 and 2, got stage=3"
    ):
        ZeroOptimizer([torch.nn.Parameter(torch.ones(2))], torch.optim.AdamW, stage=3)
    with pytest.raises(ValueError, match="recompute needs the model's blocks"):
        parallelize(torch.nn.Linear(2, 2), recompute=RecomputeConfig())
    with pytest.raises(ValueError, match="data_parallel='fsdp' needs a mesh"):
        parallelize(torch.nn.Linear(2, 2), data_parallel="fsdp")


# -- recompute and compile in one process --------------------------------------------------


def _backward_ops(model, tokens) -> tuple[Counter[str], dict[str, torch.Tensor]]:
    loss = model(tokens).logsumexp(-1).mean()
    with tm.OpCounter() as mode:
        loss.backward()
    return mode.counts, {n: p.grad for n, p in model.named_parameters()}


SDPA = "aten._scaled_dot_product_flash_attention_for_cpu"


@pytest.mark.parametrize(
    ("config", "recomputed", "not_recomputed"),
    [
        (RecomputeConfig(mode="full"), {SDPA: 2, "aten.mm": 10, "aten.rsqrt": 4}, set()),
        (RecomputeConfig(mode="full", every=2), {SDPA: 1, "aten.mm": 5}, set()),
        (RecomputeConfig(mode="selective", ops="attention"), {SDPA: 2}, {"aten.mm", "aten.rsqrt"}),
        (RecomputeConfig(mode="selective", ops="pointwise"), {"aten.rsqrt": 4}, {SDPA, "aten.mm"}),
        (
            RecomputeConfig(mode="selective", ops=("aten.silu",)),
            {"aten.silu": 2},
            {SDPA, "aten.mm", "aten.rsqrt"},
        ),
    ],
    ids=["full", "full_every_2", "attention", "pointwise", "silu"],
)
def test_recompute_gives_the_same_gradients_and_recomputes_what_it_says(
    config, recomputed, not_recomputed
):
    # Recomputation stops once backward has what it needs: each block's last projection
    # (down_proj) is not rerun, so full recompute reruns 5 of the 6 matmuls per block.
    tokens = torch.randint(0, 64, (2, 8))
    plain = tm.build_tiny()
    model = copy.deepcopy(plain)
    result = parallelize(model, None, recompute=config)
    base_ops, base_grads = _backward_ops(plain, tokens)
    ops, grads = _backward_ops(result.model, tokens)
    for name, grad in base_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-7)
    extra = {op: ops[op] - base_ops[op] for op in set(ops) | set(base_ops)}
    for op, count in recomputed.items():
        assert extra[op] == count, (op, extra[op])
    for op in not_recomputed:
        assert extra.get(op, 0) == 0, (op, extra[op])
    # a checkpointed module's description is inherited by its children (the attention preset
    # checkpoints the attention submodule, the others the block)
    assert result.summary.row("layers.0.attn.q_proj").recompute.split()[0] == config.mode
    assert "recompute" in str(result.summary)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_compile_each_block_after_recompute(mode):
    tokens = torch.randint(0, 64, (2, 8))
    plain = tm.build_tiny()
    model = copy.deepcopy(plain)
    result = parallelize(
        model,
        None,
        recompute=RecomputeConfig(mode=mode),
        compile=CompileConfig(backend="aot_eager"),
    )
    out = result.model(tokens)
    torch.testing.assert_close(out, plain(tokens))
    out.sum().backward()
    plain(tokens).sum().backward()
    torch.testing.assert_close(
        model.layers[0].attn.q_proj.weight.grad, plain.layers[0].attn.q_proj.weight.grad
    )
    assert result.summary.order == (f"recompute ({mode})", "compile")
    assert result.summary.row("layers.1").compiled == "aot_eager"
    assert result.summary.row("lm_head").compiled == "-"


# -- placements and summaries at simulated scale (fake process group) ---------------------


def test_tp4_fsdp4_placements_at_16_ranks(fake_pg):
    with fake_pg(world_size=16, rank=5):
        model, summary = parallelize(
            _wide(),
            ParallelDims(world_size=16, tp=4),
            plan=tm.tiny_plan(sequence_parallel=True),
            fsdp=FSDPConfig(param_dtype=torch.bfloat16),
            recompute=RecomputeConfig(mode="selective"),
        )
        attn = model.layers[0].attn
        assert (attn.num_heads, attn.num_kv_heads) == (2, 2)
        q = attn.q_proj.weight  # (64, 64): 16 rows per TP rank, 4 per FSDP rank
        assert q.to_local().shape == (4, 64)
        assert q.device_mesh.mesh_dim_names == ("dp_shard_cp", "tp")
        gate_up = model.layers[0].mlp.gate_up_proj.weight  # (256, 64): packed, FSDP on dim 1
        assert gate_up.to_local().shape == (64, 16)
        assert summary.row("layers.0.mlp.gate_up_proj").placements == (
            "Shard(1)@dp_shard_cp StridedShard(0,sf=2)@tp"
        )
        assert summary.row("layers.0.attn_norm").tensor_parallel == "sequence_parallel"
        row = summary.row("layers.0.attn.o_proj")
        assert (row.tensor_parallel, row.placements) == (
            "rowwise",
            "Shard(0)@dp_shard_cp Shard(1)@tp",
        )
        assert (row.data_parallel, row.param_dtype, row.reduce_dtype) == (
            "FSDP (layers.0)",
            "bfloat16",
            "float32",
        )
        assert summary.row("layers.1").data_parallel == "FSDP unit"
        assert summary.row("").data_parallel == "FSDP root"
        # the attention preset checkpoints each block's attention submodule only
        assert summary.row("layers.1.attn.o_proj").recompute == "selective (attention)"
        assert summary.row("layers.1.mlp.down_proj").recompute == "-"
        assert summary.loss_parallel
        text = str(summary)
        assert text.splitlines()[0].startswith("parallelize: world_size=16 dp_shard=4 tp=4")
        assert "tensor+sequence parallel -> recompute (selective) -> FSDP (ZeRO-3)" in text


def test_tied_embedding_and_head_stay_one_tensor_under_tp(fake_pg):
    """A vocab-parallel embedding and a column-parallel head shard the tied [vocab, hidden]
    matrix alike: after TP they are one DTensor again (one gradient, as in one process)."""
    for head_style in ("loss_parallel", "colwise_output_replicated"):
        with fake_pg(world_size=2, rank=1):
            model = tm.build_tiny(dim=32, n_layers=1)
            model.lm_head.weight = model.embed.weight
            plan = tm.tiny_plan(loss_parallel=head_style == "loss_parallel")
            parallelize(model, ParallelDims(world_size=2, tp=2), plan=plan)
            assert model.lm_head.weight is model.embed.weight
            assert model.embed.weight.to_local().shape == (32, 32)  # vocab 64 / 2
            assert len(list(model.parameters())) == len(dict(model.named_parameters()))
    with fake_pg(world_size=2, rank=0):
        model = tm.build_tiny(dim=32, n_layers=1)
        model.lm_head.weight = model.embed.weight
        plan = tm.tiny_plan()
        plan.styles["lm_head"] = "rowwise"  # shards the shared matrix by columns
        with pytest.raises(
            ValueError, match=r"tied parameters \['embed.weight', 'lm_head.weight'\]"
        ):
            parallelize(model, ParallelDims(world_size=2, tp=2), plan=plan)


def test_hsdp_and_ddp_placements(fake_pg):
    with fake_pg(world_size=8, rank=3):
        _, summary = parallelize(tm.build_tiny(), ParallelDims(world_size=8, dp_replicate=2))
        assert summary.data_parallel == "hsdp"
        assert summary.row("embed").placements == "Replicate@dp_replicate Shard(0)@dp_shard_cp"
    with fake_pg(world_size=4, rank=1):
        _, summary = parallelize(
            tm.build_tiny(), ParallelDims(world_size=4, dp_replicate=4, dp_shard=1)
        )
        assert summary.data_parallel == "ddp"
        assert summary.row("embed").placements == "Replicate@dp"
        assert summary.row("layers.0").data_parallel == "DDP bucket"
    offload = FSDPConfig(cpu_offload=True)
    with fake_pg(world_size=2), pytest.raises(ValueError, match="cpu_offload=True moves sharded"):
        parallelize(tm.build_tiny(), ParallelDims(world_size=2), fsdp=offload)


def test_sequence_parallel_refuses_a_sequence_tp_does_not_divide(fake_pg):
    """Sequence parallelism cuts the embedding output into tp shards: an odd length is refused
    there, before any collective (R7: uneven shards aborted gloo at the next all-gather)."""
    with fake_pg(world_size=2, rank=1):
        model = tm.build_tiny(dim=32, n_layers=1)
        parallelize(
            model, ParallelDims(world_size=2, tp=2), plan=tm.tiny_plan(sequence_parallel=True)
        )
        assert model(torch.randint(0, 64, (1, 8))).shape[1] == 8  # (even: runs)
        message = r"vocab_parallel_embedding: sequence length 7 \(dim 1\) is not divisible by tp=2"
        with pytest.raises(ValueError, match=message):
            model(torch.randint(0, 64, (1, 7)))


def _olmo2():
    """A tiny ``transformers`` OLMo2: its q_norm / k_norm normalize over all heads x head_dim,
    the features a column-parallel q_proj / k_proj splits."""
    from transformers import Olmo2Config, Olmo2ForCausalLM

    torch.manual_seed(0)
    config = Olmo2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=2,
        pad_token_id=1,
        attn_implementation="sdpa",
    )
    return Olmo2ForCausalLM(config)


def _olmo2_plan(*, sequence_parallel: bool, norms: str | None) -> TPPlan:
    a = "model.layers.*.self_attn"
    styles = {a: "block_input", f"{a}.o_proj": "rowwise"}
    styles |= {f"{a}.{p}": "colwise" for p in ("q_proj", "k_proj", "v_proj")}
    if norms is not None:
        styles |= {f"{a}.q_norm": norms, f"{a}.k_norm": norms}
    if sequence_parallel:
        styles |= {"model": "replicate"}  # everything else whole, on sequence shards
    attributes = {a: {"config.num_attention_heads": "check", "config.num_key_value_heads": "check"}}
    return TPPlan(styles=styles, attributes=attributes, sequence_parallel=sequence_parallel)


def test_a_norm_over_sharded_features_is_named_not_offered_replicate_partial(fake_pg):
    model = _olmo2()
    # under sp, a norm without a style inside the block: not the per-head advice
    with pytest.raises(
        ValueError,
        match=r"model\.layers\.0\.self_attn\.q_norm\.weight sits inside the 'block_input' block "
        r"model\.layers\.0\.self_attn without a style of its own, and its 32 features are the "
        r"whole output of a column-parallel projection",
    ) as caught:
        validate_tp(model, _olmo2_plan(sequence_parallel=True, norms=None), 2)
    assert "Give it a style: 'replicate_partial'" not in str(caught.value)
    # replicate_partial (or replicate) on it: named with its sizes at the first forward,
    # instead of a shape error deep inside transformers
    with fake_pg(world_size=2, rank=0):
        result = parallelize(
            model,
            ParallelDims(world_size=2, tp=2),
            plan=_olmo2_plan(sequence_parallel=False, norms="replicate_partial"),
        )
        with pytest.raises(
            ValueError,
            match=r"replicate: model\.layers\.0\.self_attn\.q_norm \(Olmo2RMSNorm\) has a weight "
            r"of 32 features but its input has 16 in its last dimension \(tp=2\)",
        ):
            result.model(input_ids=torch.zeros(1, 4, dtype=torch.long), use_cache=False)
