"""forge-parallel's expert parallelism on forge-models' Qwen3-MoE: EP2 trains like one process.

forge-parallel does not import forge-models: the model's ``MoEExperts`` (stacked
``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``, called on rows permuted by expert) follow
the :class:`forge_parallel.expert_parallel.ExpertsModule` protocol, so
``parallelize(..., expert_parallel=EPConfig(...))`` applies to it unchanged. The registry's
``qwen3-moe-debug`` size (8 experts, top-2) trains 3 steps (AdamW, global-norm clipping) on
2 ranks with ep=2 (experts 0-3 on rank 0, 4-7 on rank 1; dense weights FSDP-sharded) and
matches the single-process run: losses, gradient norms and final parameters within 1e-5
(float32). Kernels run through their eager references (the Triton interpreter is too slow for
training on a CPU).
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist

TOLERANCE = 1e-5
STEPS, BATCH, SEQ, MAX_NORM = 3, 4, 12, 1.0


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _train(model, batches, *, rank: int, size: int, clip) -> tuple[list[float], list[float]]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    losses, norms = [], []
    for ids in batches:
        rows = ids.chunk(size)[rank]
        loss = model(rows, labels=rows)
        loss.backward()
        norm = clip(model.parameters(), MAX_NORM)
        opt.step()
        opt.zero_grad()
        loss = loss.detach().clone()
        if size > 1:
            dist.all_reduce(loss)
            loss /= size
        losses.append(loss.item())
        norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
    return losses, norms


def _job() -> dict[str, float]:
    os.environ["FORGE_KERNELS_IMPL"] = "reference"
    try:
        return _compare()
    finally:
        del os.environ["FORGE_KERNELS_IMPL"]


def _compare() -> dict[str, float]:
    import forge_parallel
    from forge_core import ParallelDims
    from forge_models import registry
    from forge_parallel.expert_parallel import EPConfig

    torch.manual_seed(0)
    model = registry.build_model("qwen3-moe-debug", num_layers=2, initializer_range=0.1)
    initial = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(7)
    vocab = model.config.vocab_size
    batches = [torch.randint(0, vocab, (BATCH, SEQ), generator=gen) for _ in range(STEPS)]
    ref_losses, ref_norms = _train(
        model, batches, rank=0, size=1, clip=torch.nn.utils.clip_grad_norm_
    )
    assert max(ref_norms) > MAX_NORM, ref_norms  # clipping bites

    size = dist.get_world_size()
    ep_model = copy.deepcopy(initial)
    result = forge_parallel.parallelize(
        ep_model,
        ParallelDims(world_size=size, ep=2),
        expert_parallel=EPConfig(experts="layers.*.mlp.experts"),
    )
    row = result.summary.row("layers.0.mlp.experts")
    assert row.tensor_parallel == "expert parallel (ep=2: 4 of 8 experts)", row
    assert row.data_parallel.startswith("FSDP unit (experts, edp=1)"), row
    assert "expert parallel" in result.summary.order
    experts = dict(ep_model.named_modules())["layers.0.mlp.experts"]
    assert experts.gate_up_proj.to_local().shape[0] == 8 // 2  # local experts only (before gather)
    losses, norms = _train(
        result.model, batches, rank=dist.get_rank(), size=size, clip=forge_parallel.clip_grad_norm_
    )
    params = {n: p.detach().full_tensor() for n, p in ep_model.named_parameters()}
    ref = dict(model.named_parameters())
    assert params.keys() == ref.keys()
    return {
        "loss": max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True)),
        "norm": max(abs(a - b) / abs(b) for a, b in zip(norms, ref_norms, strict=True)),
        "param": max(_rel(params[n], ref[n].detach()) for n in ref),
    }


def test_qwen3_moe_ep2_matches_one_process(dist_pool):
    per_rank = dist_pool(2).run(_job)
    print(per_rank)  # shown with pytest -s
    for rank, errors in enumerate(per_rank):
        assert max(errors.values()) <= TOLERANCE, (rank, errors)
