"""Selective activation recompute (Korthikanti et al. 2022, arXiv:2205.05198) under context
parallelism, on the gloo pool.

The context-parallel attention (ring exchanges or Ulysses all-to-alls around the attention
core) is one unit for a selective policy (``forge_parallel.replay_checkpoint.recomputed_whole``):
op by op, the policy cached the ring's receive buffers and skipped some of the exchanges in the
recomputation, and the ranks deadlocked in backward. Now the policy never sees its ops, and it
is recomputed whole, in the same order on every rank. Checked: CP2 x FSDP2 ring (zigzag) and
Ulysses with the ``attention`` and ``pointwise`` presets, and auto recompute choosing a
selective policy, train like one process; the policy is asked about the projections but about
none of the attention's ops (no collective, no block merge, no attention core).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.distributed as dist

import forge_parallel
from forge_core import ParallelDims
from forge_core.testing import import_path
from forge_parallel import RecomputeConfig
from forge_parallel.context_parallel import CPConfig, shard_sequence

tm = import_path(Path(__file__).with_name("tiny_models.py"), "forge_parallel_tests_tiny_models")

TOLERANCE = 1e-5
#: A budget under what a tiny block keeps without recompute but above its input and the
#: projections' outputs: auto recompute picks a selective policy.
_AUTO_BUDGET = 6 * 1024

_CP2_FSDP2 = {"cp": 2, "dp_shard": 2}


def _layouts() -> dict[str, dict]:
    return {
        "ring_zigzag_selective_attention": {
            "context_parallel": CPConfig(),
            "recompute": RecomputeConfig(mode="selective", ops="attention"),
        },
        "ulysses_selective_attention": {
            "context_parallel": CPConfig(style="ulysses"),
            "recompute": RecomputeConfig(mode="selective", ops="attention"),
        },
        "ring_contiguous_selective_pointwise": {
            "context_parallel": CPConfig(load_balance=False),
            "recompute": RecomputeConfig(mode="selective", ops="pointwise"),
        },
        # module-level (Megatron-Core's recompute_modules): attn and mlp checkpointed whole,
        # their forward replayed under the context-parallel router
        "ring_zigzag_modules_attn_mlp": {
            "context_parallel": CPConfig(),
            "recompute": RecomputeConfig(mode="selective", modules=("attn", "mlp")),
        },
        "ring_zigzag_auto": {
            "context_parallel": CPConfig(),
            "recompute": RecomputeConfig(mode="auto", memory_budget=_AUTO_BUDGET),
        },
    }


def _layouts_job() -> dict:
    """Every layout's errors against one process, and what auto recompute chose per block."""
    batches = tm.make_batches()
    reference_model = tm.build_tiny()
    initial = copy.deepcopy(reference_model)
    reference = tm.train(reference_model, batches)
    ref_params = tm.full_params(reference_model)
    errors, choices = {}, {}
    for name, layout in _layouts().items():
        dims = ParallelDims(world_size=dist.get_world_size(), **_CP2_FSDP2)
        result = forge_parallel.parallelize(copy.deepcopy(initial), dims, **layout)
        got = tm.train(result.model, batches, result=result)
        errors[name] = tm.compare(reference, ref_params, got, tm.full_params(result.model))
        if layout["recompute"].mode == "auto":
            choices[name] = sorted(
                {
                    m._forge_recompute
                    for m in result.model.modules()
                    if hasattr(m, "_forge_recompute")
                }
            )
    return {"errors": errors, "choices": choices}


def _policy_job(style: str) -> dict:
    """The op names a selective policy is asked about in one forward and backward of a CP2
    block, and the gradient of its input."""
    from forge_parallel import recompute

    asked: set[str] = set()
    original = recompute.selective_policy

    def recording_policy(ops, **options):
        policy = original(ops, **options)

        def record(ctx, op, *args, **kwargs):
            asked.add(recompute._op_name(op))
            return policy(ctx, op, *args, **kwargs)

        return record

    recompute.selective_policy = recording_policy
    try:
        model = tm.build_tiny()
        dims = ParallelDims(world_size=dist.get_world_size(), cp=2, dp_shard=1)
        result = forge_parallel.parallelize(
            model,
            dims,
            context_parallel=CPConfig(style=style),
            recompute=RecomputeConfig(mode="selective", ops="attention"),
        )
    finally:
        recompute.selective_policy = original
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    rank = dist.get_rank()
    local = shard_sequence(tokens, dim=1, cp_size=2, cp_rank=rank)
    positions = shard_sequence(torch.arange(16), dim=0, cp_size=2, cp_rank=rank)
    logits = tm.logits_of(result.model, local, positions)
    forward_ops = set(asked)
    if not _attention_ops(forward_ops):  # (else its backward would deadlock the ranks)
        logits.float().square().mean().backward()
    return {"forward": forward_ops, "all": asked}


def _attention_ops(names: set[str]) -> set[str]:
    """The ops among ``names`` that only the context-parallel attention runs: exchanges,
    the ring's blocks (scores' log-sum-exp, merge), the attention core between all-to-alls."""
    ring = {"aten.logsumexp", "aten.logaddexp", "aten.index_copy"}
    return {n for n in names if "c10d" in n or n in ring or "scaled_dot_product" in n}


def _check_errors(errors: dict) -> None:
    bad = {name: err for name, err in errors.items() if max(err.values()) > TOLERANCE}
    assert not bad, f"relative errors above {TOLERANCE}: {bad}"


def test_selective_recompute_under_cp2_fsdp2_matches_one_process(dist_pool):
    per_rank = dist_pool(4).run(_layouts_job)
    for rank_result in per_rank:
        _check_errors(rank_result["errors"])
    # auto recompute under CP picked a selective policy for the blocks (not none / full)
    choices = per_rank[0]["choices"]["ring_zigzag_auto"]
    assert choices, per_rank[0]["choices"]
    assert all(c.startswith("auto: selective") for c in choices), choices


def test_selective_policy_never_sees_the_context_parallel_attention(dist_pool):
    for style in ("ring", "ulysses"):
        for asked in dist_pool(2).run(_policy_job, style):
            # the projections are the policy's, ...
            assert {"aten.mm", "aten.addmm"} & asked["forward"], asked["forward"]
            # ... the attention is one unit outside it, in forward and recomputation
            assert not _attention_ops(asked["all"]), (style, sorted(_attention_ops(asked["all"])))
