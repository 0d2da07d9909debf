"""ZeroOptimizer when ranks leave parameters without a gradient, with nothing to train, and
per-group options; gradient-norm clipping over an empty FSDP shard. On the gloo worker pool.

The reference is one process that sees every rank's micro-batches (the loss averaged over
ranks); a parameter without a gradient there is skipped by AdamW (grad ``None``).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from forge_parallel import ZeroOptimizer, clip_grad_norm_


def _model() -> nn.ModuleDict:
    torch.manual_seed(0)
    return nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4), "c": nn.Linear(4, 4)})


def _loss(model, x, use_b: bool):
    y = model["a"](x)
    if use_b:
        y = model["b"](y)
    return model["c"](y).pow(2).sum()


def _uses_b(step: int, rank: int, mode: str, micro: int) -> bool:
    """Step 0: everyone uses b. Then ``rank_skip``: only rank 0's first micro-batch does;
    ``all_skip``: nobody does (b gets no gradient on any rank)."""
    if step == 0:
        return True
    return mode == "rank_skip" and rank == 0 and micro == 0


def _job_unused(configs):
    return [_run_unused(*config) for config in configs]


def _run_unused(stage: int, mode: str, bucket_numel: int):
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1)
    steps, micro = 3, 2
    xs = torch.randn(steps, world, micro, 3, 4)
    options = {"lr": 0.1, "weight_decay": 0.1}

    ref = _model()
    ref_opt = torch.optim.AdamW(ref.parameters(), **options)
    ref_norms = []
    for s in range(steps):
        ref_opt.zero_grad(set_to_none=True)
        for r in range(world):
            for m in range(micro):
                (_loss(ref, xs[s, r, m], _uses_b(s, r, mode, m)) / world).backward()
        ref_norms.append(nn.utils.clip_grad_norm_(ref.parameters(), 1.0).item())
        ref_opt.step()

    model = _model()
    opt = ZeroOptimizer(
        model.parameters(), torch.optim.AdamW, stage=stage, bucket_numel=bucket_numel, **options
    )
    norms = []
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        for m in range(micro):
            # each rank's loss as it is (the reduction averages over ranks, as DDP)
            _loss(model, xs[s, rank, m], _uses_b(s, rank, mode, m)).backward()
        norms.append(opt.clip_grad_norm_(1.0).item())
        opt.step()
    diffs = {
        n: (p - q).abs().max().item()
        for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True)
    }
    return diffs, norms, ref_norms


def _check_unused(configs, results):
    for rank_results in results:
        for config, (diffs, norms, ref_norms) in zip(configs, rank_results, strict=True):
            for name, diff in diffs.items():
                assert diff < 1e-6, (config, name, diff, diffs)
            torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=0, msg=str(config))


def test_zero_matches_one_process_when_ranks_skip_parameters(dist_pool):
    # bucket_numel 20: a, b, c in buckets of their own (a bucket no rank completes, one only
    # rank 0 completes); 2**24: one bucket whose shards straddle the parameters.
    configs = [
        (stage, mode, bucket_numel)
        for stage in (1, 2)
        for bucket_numel in (20, 2**24)
        for mode in ("rank_skip", "all_skip")
    ]
    _check_unused(configs, dist_pool(2).run(_job_unused, configs))


def _job_empty_and_groups():
    group_size = dist.get_world_size()
    # A pipeline stage with nothing to train: an optimizer without buckets that still joins
    # the norm's reduction.
    empty = ZeroOptimizer([{"params": [], "weight_decay": 0.0}], torch.optim.AdamW, stage=2)
    norm = empty.clip_grad_norm_(1.0, also_over=dist.group.WORLD)
    empty.step()
    empty.zero_grad()
    assert norm.item() == 0.0
    assert empty.state_dict()["master"] == []
    assert sum(len(g["params"]) for g in empty.param_groups) == 0

    # One param group per group given; options set on it reach its shards.
    torch.manual_seed(dist.get_rank())  # replicas start different: construction equalizes
    m = nn.ModuleDict({"a": nn.Linear(8, 8), "b": nn.Linear(8, 8), "frozen": nn.Linear(8, 8)})
    m["frozen"].requires_grad_(False)
    groups = [
        {"params": [m["a"].weight, m["b"].weight, m["frozen"].weight], "weight_decay": 0.1},
        {"params": [m["a"].bias, m["b"].bias], "weight_decay": 0.0},
    ]
    opt = ZeroOptimizer(groups, torch.optim.AdamW, bucket_numel=64, lr=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 1.0, lambda s: 0.0])
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    m["b"](m["a"](torch.ones(2, 8))).sum().backward()
    opt.step()
    # lr 0 for the biases: unchanged; the weights moved
    assert torch.equal(m["a"].bias, before["a.bias"])
    assert torch.equal(m["b"].bias, before["b.bias"])
    assert not torch.equal(m["a"].weight, before["a.weight"])
    gathered = [torch.empty_like(m["frozen"].weight) for _ in range(group_size)]
    dist.all_gather(gathered, m["frozen"].weight.detach().contiguous())
    return all(torch.equal(gathered[0], g) for g in gathered)


def test_empty_zero_optimizer_and_param_groups(dist_pool):
    assert all(dist_pool(2).run(_job_empty_and_groups))


def _job_norm_empty_fsdp_shard():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    ref = nn.Linear(4, 1)  # the bias has 1 element: rank 1's FSDP shard of it is empty
    model = nn.Linear(4, 1)
    model.load_state_dict(ref.state_dict())
    fully_shard(model, mesh=mesh)
    x = torch.randn(8, 4)
    ref(x).pow(2).mean().backward()
    model(x[dist.get_rank() * 4 :][:4]).pow(2).mean().backward()
    got = {}
    for norm_type in (2.0, math.inf):
        got[norm_type] = clip_grad_norm_(list(model.parameters()), 1e9, norm_type).item()
    want = {
        norm_type: torch.linalg.vector_norm(
            torch.cat([p.grad.reshape(-1) for p in ref.parameters()]), norm_type
        ).item()
        for norm_type in (2.0, math.inf)
    }
    return got, want


def test_grad_norm_with_an_empty_fsdp_shard(dist_pool):
    for got, want in dist_pool(2).run(_job_norm_empty_fsdp_shard):
        for norm_type in want:
            assert math.isclose(got[norm_type], want[norm_type], rel_tol=1e-5), (got, want)
