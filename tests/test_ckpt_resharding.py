"""Training checkpoints reshard: save at TP2 x FSDP2 (4 ranks), resume at FSDP4, HSDP 2x2 and
in one process without a process group, with the same next-step losses; and save with a ZeRO-2
optimizer (2 ranks), resume at ZeRO-2 with other buckets, at ZeRO-1 and in one process.

The saving job writes asynchronously while it keeps training, so its own losses after the
save are the uninterrupted run. Every layout is also compared with a single-process reference
trained from the same initial weights (forge-parallel's exactness contract): relative error
<= 1e-5 in float32. Resuming layouts start from other weights and a fresh optimizer and
scheduler, so only a correct load can match. Two steps are compared after resuming: the first
checks the weights, the second the optimizer moments and the learning-rate schedule.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from forge_ckpt.training import CheckpointConfig, CheckpointManager
from forge_core.testing import import_path

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5
SAVE_AT, RESUME_STEPS = 2, 2


def _tm():
    return import_path(
        ROOT / "packages" / "forge-parallel" / "tests" / "tiny_models.py",
        "forge_ckpt_resharding_tiny_models",
    )


def _layouts() -> dict[str, dict]:
    return {
        "tp2_fsdp2": {"dims": {"tp": 2, "dp_shard": 2}, "plan": _tm().tiny_plan()},
        "fsdp4": {"dims": {}},
        "hsdp_2x2": {"dims": {"dp_replicate": 2, "dp_shard": 2}},
    }


def _setup(seed: int, layout: dict | None):
    """Model (parallelized per ``layout``, or single-process), AdamW and a warm-up schedule."""
    import forge_parallel
    from forge_core import ParallelDims

    tm = _tm()
    model = tm.build_tiny(seed)
    result = None
    if layout is not None:
        kwargs = dict(layout)
        dims = ParallelDims(world_size=dist.get_world_size(), **kwargs.pop("dims"))
        options = kwargs.pop("optimizer", {})
        result = forge_parallel.parallelize(model, dims, **kwargs)
        model = result.model
        opt = result.build_optimizer(torch.optim.AdamW, lr=tm.LR, weight_decay=0.1, **options)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=tm.LR, weight_decay=0.1)
    return model, result, opt, _schedule(opt)


def _schedule(opt, last_epoch: int = -1):
    """A warm-up schedule; ``last_epoch`` resumes it from the optimizer's ``initial_lr``."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(1.0, (step + 1) / 4), last_epoch=last_epoch
    )


def _train(model, result, opt, sched, steps) -> list[float]:
    """tiny_models.train's loop (data split over DP ranks, accumulation, clipping) with the
    given optimizer and scheduler; returns the losses, averaged over DP ranks."""
    import forge_parallel

    tm = _tm()
    mesh = result.mesh if result is not None else None
    dp = mesh["dp"] if mesh is not None else None
    dp_size, dp_rank = (dp.size(), dp.get_local_rank()) if dp is not None else (1, 0)
    losses = []
    for micro_batches in steps:
        step_loss = torch.zeros(())
        for i, tokens in enumerate(micro_batches):
            rows = tokens.chunk(dp_size)[dp_rank]
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or result is None else result.no_sync()
            loss_ctx = result.loss_context() if result is not None else contextlib.nullcontext()
            with sync, loss_ctx:
                logits = tm.logits_of(model, rows[:, :-1])
                loss = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())
                loss = loss / len(micro_batches)
                loss.backward()
            step_loss += tm._value(loss).detach()
        if isinstance(opt, forge_parallel.ZeroOptimizer):
            opt.clip_grad_norm_(tm.MAX_NORM)  # the reduced gradients exist as shards only
        elif result is None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tm.MAX_NORM)
        else:
            forge_parallel.clip_grad_norm_(model.parameters(), tm.MAX_NORM)
        opt.step()
        opt.zero_grad()
        sched.step()
        if dp is not None:
            dist.all_reduce(step_loss, group=dp.get_group())
            step_loss /= dp_size
        losses.append(step_loss.item())
    return losses


def _save_and_resume(directory: str) -> dict[str, list[float]]:
    batches = _tm().make_batches()[: SAVE_AT + RESUME_STEPS]
    out = {"reference": _train(*_setup(0, None), batches)}
    layouts = _layouts()
    model, result, opt, sched = _setup(0, layouts.pop("tp2_fsdp2"))
    _train(model, result, opt, sched, batches[:SAVE_AT])
    with CheckpointManager(CheckpointConfig(directory=directory, async_save=True)) as manager:
        manager.save(SAVE_AT, model=model, optimizer=opt, scheduler=sched)
        out["tp2_fsdp2 (no restart)"] = _train(model, result, opt, sched, batches[SAVE_AT:])
    for name, layout in layouts.items():
        model, result, opt, sched = _setup(1, layout)
        loaded = CheckpointManager(CheckpointConfig(directory=directory)).load_latest(
            model=model, optimizer=opt, scheduler=sched
        )
        assert loaded.step == SAVE_AT
        assert loaded.world_size == 4
        assert set(loaded.restored) == {"scheduler", "rng"}, loaded
        out[name] = _train(model, result, opt, sched, batches[SAVE_AT:])
    return out


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _resume_in_this_process(directory, results: dict[str, list[float]]) -> None:
    """Resume in this process (no process group at all) and check every run's losses."""
    model, result, opt, sched = _setup(1, None)
    loaded = CheckpointManager(CheckpointConfig(directory=directory)).load_latest(
        model=model, optimizer=opt, scheduler=sched
    )
    assert loaded.step == SAVE_AT
    assert "rng" in loaded.restored
    batches = _tm().make_batches()[SAVE_AT : SAVE_AT + RESUME_STEPS]
    results["one process"] = _train(model, result, opt, sched, batches)

    expected = results.pop("reference")[SAVE_AT:]
    for name, losses in results.items():  # shown with pytest -s
        print(f"{name:24s} " + " ".join(f"{x:.7f}" for x in losses))
    bad = {
        name: [_rel(a, b) for a, b in zip(losses, expected, strict=True)]
        for name, losses in results.items()
        if max(_rel(a, b) for a, b in zip(losses, expected, strict=True)) > TOLERANCE
    }
    assert not bad, f"relative loss errors above {TOLERANCE} after resuming: {bad}"


def test_save_tp2_fsdp2_resume_fsdp4_hsdp_and_one_process(dist_pool, tmp_path):
    per_rank = dist_pool(4).run(_save_and_resume, str(tmp_path))
    results = per_rank[0]
    assert all(r == results for r in per_rank[1:])  # losses are averaged over DP ranks

    _resume_in_this_process(tmp_path, results)


def _save_zero2_and_resume(directory: str) -> dict[str, list[float]]:
    """ZeRO-2 saves its flat optimizer slices by parameter name; other slicings read them."""
    batches = _tm().make_batches()[: SAVE_AT + RESUME_STEPS]
    out = {"reference": _train(*_setup(0, None), batches)}
    model, result, opt, sched = _setup(0, {"dims": {}, "data_parallel": "zero2"})
    _train(model, result, opt, sched, batches[:SAVE_AT])
    with CheckpointManager(CheckpointConfig(directory=directory, async_save=True)) as manager:
        manager.save(SAVE_AT, model=model, optimizer=opt, scheduler=sched)
        out["zero2 (no restart)"] = _train(model, result, opt, sched, batches[SAVE_AT:])
    resume_layouts = {
        # small buckets: every slice boundary falls elsewhere in the parameters
        "zero2, other buckets": {
            "dims": {},
            "data_parallel": "zero2",
            "optimizer": {"bucket_numel": 999},
        },
        "zero1": {"dims": {}, "data_parallel": "zero1"},
    }
    for name, layout in resume_layouts.items():
        model, result, opt, sched = _setup(1, layout)
        # The scheduler's state is per parameter group, and ZeroOptimizer has one group per
        # bucket: with other buckets it restarts from the restored groups' initial_lr.
        same_groups = "optimizer" not in layout
        loaded = CheckpointManager(CheckpointConfig(directory=directory)).load_latest(
            model=model, optimizer=opt, scheduler=sched if same_groups else None
        )
        assert loaded.world_size == 2
        if not same_groups:
            sched = _schedule(opt, last_epoch=SAVE_AT - 1)
        out[name] = _train(model, result, opt, sched, batches[SAVE_AT:])
    return out


def test_save_zero2_resume_other_slices_and_one_process(dist_pool, tmp_path):
    per_rank = dist_pool(2).run(_save_zero2_and_resume, str(tmp_path))
    assert per_rank[0] == per_rank[1]
    _resume_in_this_process(tmp_path, per_rank[0])


def _zero_with_an_unused_parameter(directory: str, stage: int) -> list[float]:
    """ZeRO where one parameter never gets a gradient (no optimizer state, not stepped, as a
    single process skips it): the checkpoint saves (it used to fail on the missing state),
    and a resumed run continues as the uninterrupted one."""
    import forge_parallel

    def setup():
        torch.manual_seed(0)
        model = torch.nn.ModuleDict({n: torch.nn.Linear(8, 8) for n in ("a", "unused", "b")})
        opt = forge_parallel.ZeroOptimizer(
            model.parameters(), torch.optim.AdamW, stage=stage, lr=1e-2, weight_decay=0.1
        )
        return model, opt

    def train(model, opt, steps):
        for step in steps:
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step + dist.get_rank()))
            model["b"](model["a"](x)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    model, opt = setup()
    train(model, opt, range(2))
    with CheckpointManager(CheckpointConfig(directory=directory)) as manager:
        manager.save(2, model=model, optimizer=opt)
    straight = train(model, opt, range(2, 4))
    model, opt = setup()
    CheckpointManager(CheckpointConfig(directory=directory)).load_latest(model=model, optimizer=opt)
    resumed = train(model, opt, range(2, 4))
    return [(a - b).abs().max().item() for a, b in zip(straight, resumed, strict=True)]


def test_zero_checkpoint_with_a_parameter_that_never_had_a_gradient(dist_pool, tmp_path):
    for stage in (1, 2):
        for diffs in dist_pool(2).run(_zero_with_an_unused_parameter, f"{tmp_path}/{stage}", stage):
            assert max(diffs) == 0.0, diffs


def _zero_on_a_frozen_stage(directory: str) -> bool:
    """Pipeline-like: rank 0's stage trains under ZeRO, rank 1's is frozen (an empty
    ZeroOptimizer). The flat save and load are collective over every rank: the frozen stage
    must join them (it used to pass no optimizer and the other stage's save hung)."""
    import forge_parallel

    rank = dist.get_rank()
    groups = [dist.new_group([0]), dist.new_group([1])]

    def setup():
        torch.manual_seed(rank)
        model = torch.nn.ModuleDict({f"stage{rank}": torch.nn.Linear(4, 4)})
        model.requires_grad_(rank == 0)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = forge_parallel.ZeroOptimizer(
            [{"params": params}], torch.optim.AdamW, group=groups[rank], lr=1e-2
        )
        return model, opt

    model, opt = setup()
    if rank == 0:
        model["stage0"](torch.randn(2, 4)).sum().backward()
    opt.step()
    with CheckpointManager(CheckpointConfig(directory=directory)) as manager:
        manager.save(1, model=model, optimizer=opt)
    saved = [p.detach().clone() for p in model.parameters()]
    model, opt = setup()
    CheckpointManager(CheckpointConfig(directory=directory)).load_latest(model=model, optimizer=opt)
    return all(torch.equal(a, b) for a, b in zip(saved, model.parameters(), strict=True))


def test_zero_checkpoint_with_a_frozen_pipeline_stage(dist_pool, tmp_path):
    assert dist_pool(2).run(_zero_on_a_frozen_stage, str(tmp_path), timeout=60) == [True, True]
