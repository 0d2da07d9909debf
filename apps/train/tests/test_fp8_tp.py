"""``train.fp8`` under tensor and context parallelism: TP2 + SP x FSDP2, CP2 x FSDP2 and (a MoE
with a shared expert) TP2 x CP2 + SP on 4 gloo ranks give the single process's FP8 losses and
gradient norms (per-tensor scaling; amaxes all-reduced over the tensor-parallel ranks for
sharded operands and over the ranks that split the tokens: cp, and tp for layers run whole on
sequence shards; emulated FP8 GEMMs on the CPU). Layers that would not be exact are refused,
named: block-wise blocks straddling two ranks (of features, or of the weight gradient's 128
tokens).

FP8 rounding is discontinuous. Where tensor or context parallelism sums partial results (a
row-parallel layer's output, a column-parallel layer's input gradient, attention on a rank's
heads, ring attention's merged key blocks) the fp32 values differ from one process's in the
last bit, and now and then such a value sits on an FP8 rounding boundary and rounds the other
way. A step's gradients then still agree to ~3e-6 (the FP8 weight gradients of one step of a
1-layer Llama were bit-identical, per-tensor), but:

- AdamW's first updates are ``lr * sign(grad)``: a flipped near-zero weight gradient moves its
  weight by ``2 lr``. At the tiny runs' ``lr=1e-2`` the step-3 gradient norms differ by ~8e-4
  (FSDP4 without TP: equal; fp32 TP2: equal), so these runs use ``lr=1e-5``.
- Block-wise scaling re-derives a scale from every 128-element block, so a last-bit change of a
  block's largest element rescales the whole block: on a 256-wide Llama one flipped element of
  ``q_proj``'s gradient (3.6e-4 of its largest) made step 1's gradient norm differ by 1.5e-5.
  Block-wise under TP is checked exactly per layer instead (forge-parallel's
  test_fp8_tensor_parallel: 128-wide shards, 4e-7), where no partial sum feeds a quantizer.
- Deeper models spread one flip through the FP8 backward (a 4-layer tiny LLM or VLM: ~5e-4 on
  step 1's gradient norm, as large as a missing amax reduction's error), so the models here have
  2 layers, and test_fp8_tp_scales checks every scale and code of a 4-layer TP2 step against
  one process's quantizer on the gathered operand instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import forge_models
from forge_core.testing import import_path
from forge_parallel import TPPlan
from forge_train.config import ConfigError
from forge_train.fp8 import (
    check_fp8_tensor_parallel,
    check_fp8_token_split,
    convert_model_to_fp8,
)

tiny = import_path(Path(__file__).with_name("tiny_run.py"), "forge_train_tests_tiny_run")

_RUN = (  # one 2-row micro-batch per data-parallel rank, two in one process
    "data.global_batch_rows=4",
    "data.micro_batch_rows=2",
    "train.steps=3",
    "train.eval_batches=0",
    "checkpoint.export_hf=false",
    "optim.lr=1e-5",
)


def _losses(output_dir: str, *overrides: str) -> list[list[float]]:
    """Per-step ``[loss, gradient norm]`` of a tiny run (a pool job: rank 0's are the run's)."""
    return tiny.train_losses_and_norms(
        *tiny.TINY_RUN, *_RUN, f"train.output_dir={output_dir}", *overrides
    )


def _close(ranks: list[list[list[float]]], single: list[list[float]]) -> None:
    assert len(single) == 3, single
    torch.testing.assert_close(torch.tensor(ranks[0]), torch.tensor(single), rtol=1e-5, atol=1e-6)


def test_fp8_under_tp2_sp_and_cp2_fsdp2_matches_one_process(tmp_path, dist_pool):
    """TP2 + SP: every FP8 linear of the tiny Llama split: q/k/v column-parallel, o_proj and
    down_proj row-parallel, gate_up_proj packed column-parallel (each rank its halves of gate
    and up). CP2 (ring attention, zigzag chunks): every FP8 linear on the rank's two chunks of
    the sequence, its input and output-gradient amaxes reduced over cp."""
    pool = dist_pool(4)
    per_tensor = (*tiny.TINY_MODEL, "train.fp8=per_tensor")
    single = _losses(f"{tmp_path}/single", *per_tensor)
    _close(pool.run(_losses, f"{tmp_path}/tp2", *per_tensor, "parallel=tp2-fsdp"), single)
    _close(pool.run(_losses, f"{tmp_path}/cp2", *per_tensor, "parallel=cp2-fsdp"), single)


def _fp8_llama(mode: str, **sizes: int) -> torch.nn.Module:
    config = forge_models.TransformerConfig(family="llama", vocab_size=64, num_layers=1, **sizes)
    model = forge_models.build_model(config)
    convert_model_to_fp8(model, mode)
    return model


def test_blockwise_shards_that_split_a_block_are_refused():
    # k_proj: 2 kv heads x 64 = 128 features, 64 per rank at tp=2.
    model = _fp8_llama(
        "blockwise", hidden_size=256, intermediate_size=256, num_heads=4, num_kv_heads=2
    )
    plan = TPPlan(styles=model.parallel_plan(sequence_parallel=True), sequence_parallel=True)
    check_fp8_tensor_parallel(model, plan, 1, "blockwise")  # tp=1: nothing is split
    with pytest.raises(
        ConfigError,
        match=r"train.fp8=blockwise: layers.0.attn.k_proj \(colwise\) splits out_features=128 "
        r"over parallel.tp=2 into 64-wide shards, not multiples of the 128-wide",
    ):
        check_fp8_tensor_parallel(model, plan, 2, "blockwise")


def test_packed_parts_of_unequal_sizes_are_refused():
    """A plan's ``colwise_packed:a,b,c`` (forge-parallel: the weight whole on every rank, each
    computing its slice of every part) is refused under FP8 with a message, not a crash on
    parsing the part sizes as one count."""
    model = _fp8_llama(
        "per_tensor", hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2
    )
    styles = dict(model.parallel_plan(sequence_parallel=False))
    styles["layers.*.mlp.gate_up_proj"] = "colwise_packed:3,1"
    plan = TPPlan(styles=styles)
    assert (
        check_fp8_tensor_parallel(model, TPPlan(styles=model.parallel_plan()), 2, "per_tensor")
        == []
    )
    with pytest.raises(ConfigError, match=r"gate_up_proj has packed parts of unequal sizes"):
        check_fp8_tensor_parallel(model, plan, 2, "per_tensor")


#: A one-layer tiny MoE with a shared expert (FP8: run whole on each rank's sequence shard
#: under SP) and no balance statistics (MoE under SP trains without them).
_MOE_SHARED_EXPERT = (
    "model=tiny-moe",
    *tiny.TINY_MODEL,
    "model.config.num_layers=1",
    "model.config.head_dim=8",
    "model.config.moe.num_experts=4",
    "model.config.moe.moe_intermediate_size=32",
    "model.config.moe.output_router_logits=false",
    "+model.config.moe.shared_expert_intermediate_size=64",
    "train.fp8=per_tensor",
)


def test_fp8_moe_shared_expert_on_sequence_shards_matches_one_process(tmp_path, dist_pool):
    """TP2 x CP2 + SP runs the MoE block whole on each rank's sequence shard (``replicate``):
    its shared expert's FP8 amaxes are reduced over cp and tp, the attention projections' over
    cp and (sharded operands) tp. Without the token groups the gradient norms differ by ~1e-3
    (TP2 + SP alone: ~2e-4)."""
    single = _losses(f"{tmp_path}/single", *_MOE_SHARED_EXPERT)
    layout = ("parallel=tp2-fsdp", "parallel.cp=2", "parallel.sequence_parallel=true")
    _close(dist_pool(4).run(_losses, f"{tmp_path}/tp2_cp2", *_MOE_SHARED_EXPERT, *layout), single)


def test_fp8_linears_replicated_on_sequence_shards_get_a_token_group():
    """A module run whole on each rank's sequence shard (as a MoE block under sequence
    parallelism) is returned for its tp token group; without SP it runs on the whole sequence.
    Block-wise scaling refuses shards that are not runs of whole 128-token blocks."""
    model = _fp8_llama(
        "per_tensor", hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2
    )
    styles = {
        k: v for k, v in model.parallel_plan(sequence_parallel=True).items() if ".mlp" not in k
    }
    styles["layers.*.mlp"] = "replicate"
    assert check_fp8_tensor_parallel(model, TPPlan(styles=styles), 2, "per_tensor") == []
    on_shards = check_fp8_tensor_parallel(
        model, TPPlan(styles=styles, sequence_parallel=True), 2, "per_tensor"
    )
    mlp = model.layers[0].mlp
    assert on_shards == [mlp.gate_up_proj, mlp.down_proj]

    split = {"tokens": 512, "chunks": 4, "cp": 2, "tp": 2}
    check_fp8_token_split("per_tensor", **{**split, "tokens": 64}, on_sequence_shards=True)
    check_fp8_token_split("blockwise", **split, on_sequence_shards=True)  # 128-token runs
    with pytest.raises(ConfigError, match=r"each context-parallel chunk holds 64 tokens"):
        check_fp8_token_split("blockwise", **{**split, "chunks": 8}, on_sequence_shards=False)
    with pytest.raises(ConfigError, match=r"each sequence-parallel shard holds 64 tokens"):
        check_fp8_token_split("blockwise", **{**split, "cp": 4}, on_sequence_shards=True)


@pytest.mark.parametrize("mode", ["per_tensor", "blockwise"])
def test_mtp_eh_proj_runs_on_sequence_shards_for_both_recipes(mode):
    """forge-train's plan gives multi-token prediction's eh_proj its own ``replicate`` style
    under sequence parallelism: it runs on the sequence shard for block-wise scaling as for
    per-tensor (the block check must not hide it), so block-wise refuses 96-token shards (a
    weight-gradient block would mix two ranks' tokens: 3e-2 off one process)."""
    from types import SimpleNamespace

    from forge_train.components import _text_plan

    config = forge_models.TransformerConfig(
        family="llama", vocab_size=64, num_layers=1, hidden_size=256, intermediate_size=256,
        num_heads=2, num_kv_heads=2, mtp_depth=1,
    )  # fmt: skip
    model = forge_models.build_model(config)
    convert_model_to_fp8(model, mode)
    cfg = SimpleNamespace(parallel=SimpleNamespace(sequence_parallel=True, ep=1))
    plan = _text_plan(model, config, cfg)
    assert plan.styles.get("mtp.0.eh_proj") == "replicate"
    on_shards = check_fp8_tensor_parallel(model, plan, 2, mode)
    assert any(m is model.get_submodule("mtp.0.eh_proj") for m in on_shards)
    shards = {"chunks": 1, "cp": 1, "tp": 2, "on_sequence_shards": bool(on_shards)}
    check_fp8_token_split(mode, tokens=256, **shards)  # 128-token shards
    if mode == "blockwise":
        with pytest.raises(ConfigError, match=r"each sequence-parallel shard holds 96 tokens"):
            check_fp8_token_split(mode, tokens=192, **shards)
    else:
        check_fp8_token_split(mode, tokens=192, **shards)
