"""The persistent gloo worker pool itself: results, errors, hangs and recovery."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from forge_core.testing import WorkerError, WorkerPool


def _rank_and_sum() -> tuple[int, int, float]:
    x = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(x)
    return dist.get_rank(), dist.get_world_size(), x.item()


def _fail_on_rank_one() -> int:
    if dist.get_rank() == 1:
        raise ValueError("deliberate failure on rank 1")
    return dist.get_rank()


def _hang_unless_rank_zero() -> None:
    if dist.get_rank() != 0:
        dist.barrier()  # rank 0 never joins


def _random_draw() -> float:
    return torch.rand(1).item()


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_every_world_size_runs_a_collective(dist_pool, world_size):
    results = dist_pool(world_size).run(_rank_and_sum)
    expected = world_size * (world_size + 1) / 2
    assert results == [(r, world_size, expected) for r in range(world_size)]


def test_error_on_one_rank_reports_its_traceback_and_pool_survives(dist_pool):
    pool = dist_pool(2)
    with pytest.raises(WorkerError, match=r"(?s)rank\(s\) \[1\].*deliberate failure on rank 1"):
        pool.run(_fail_on_rank_one)
    assert pool.alive
    assert [r for r, _, _ in pool.run(_rank_and_sum)] == [0, 1]


def test_seed_is_applied_on_every_rank(dist_pool):
    a = dist_pool(2).run(_random_draw, seed=7)
    b = dist_pool(2).run(_random_draw, seed=7)
    c = dist_pool(2).run(_random_draw, seed=8)
    assert a == b
    assert a[0] == a[1]
    assert a != c


def test_local_functions_are_rejected_with_a_fix(dist_pool):
    def inner():
        return 1

    with pytest.raises(ValueError, match="module-level"):
        dist_pool(1).run(inner)


@pytest.mark.multiprocess
def test_hung_job_times_out_and_closes_the_pool():
    with WorkerPool(2) as pool:
        with pytest.raises(WorkerError, match="no answer from rank 1"):
            pool.run(_hang_unless_rank_zero, timeout=10)
        assert not pool.alive


def _make_groups(count: int) -> int:
    for _ in range(count):
        dist.new_group(list(range(dist.get_world_size())))
    return dist.get_rank()


def test_workers_holding_many_groups_are_restarted_before_the_next_job():
    from forge_core.testing import worker_pool

    with WorkerPool(2) as pool:
        assert pool.run(_make_groups, worker_pool.MAX_GROUPS_PER_WORKER) == [0, 1]
        assert pool.restarts == 0
        # The next job runs on fresh workers (the groups' threads are gone) and still works.
        assert pool.run(_rank_and_sum) == pool.run(_rank_and_sum)
        assert pool.restarts == 1


def _scaled_by_rank(x: torch.Tensor) -> torch.Tensor:
    return x * (dist.get_rank() + 1)


def _return_graph_tensor() -> torch.Tensor:
    return torch.ones(2, requires_grad=True) * 2  # non-leaf, requires grad: cannot be sent


def _call(fn):
    return fn()


def test_tensor_arguments_and_results_cross_to_every_rank(dist_pool):
    x = torch.arange(3.0)
    results = dist_pool(2).run(_scaled_by_rank, x, timeout=30)
    assert torch.equal(results[0], x)
    assert torch.equal(results[1], 2 * x)


def test_unpicklable_result_fails_at_once_naming_the_job(dist_pool):
    import time

    pool = dist_pool(2)
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"result of _return_graph_tensor cannot be sent back"):
        pool.run(_return_graph_tensor, timeout=30)
    assert time.monotonic() - start < 10  # not the timeout: the error comes back at once
    assert pool.alive
    assert [r for r, _, _ in pool.run(_rank_and_sum, timeout=30)] == [0, 1]


def test_unpicklable_argument_raises_type_error_before_sending(dist_pool):
    import threading

    pool = dist_pool(2)
    with pytest.raises(TypeError, match=r"arguments of _call .*argument 0 \(lock\)"):
        pool.run(_call, threading.Lock(), timeout=30)
    assert pool.alive
    assert [r for r, _, _ in pool.run(_rank_and_sum, timeout=30)] == [0, 1]


def _rank_one_dies() -> int:
    import os

    if dist.get_rank() == 1:
        os._exit(3)  # as a segfault or an OOM kill would
    return dist.get_rank()


def test_a_dead_worker_stops_its_surviving_peers(dist_pool):
    pool = dist_pool(2)
    procs = list(pool._procs)
    with pytest.raises(WorkerError, match="worker process died"):
        pool.run(_rank_one_dies, timeout=30)
    assert not pool.alive
    assert not any(p.is_alive() for p in procs)  # rank 0 was idle and alive: now stopped
    assert dist_pool(2).run(_rank_and_sum, timeout=60)[0][0] == 0  # a fresh pool replaces it


def test_pool_set_closes_a_broken_pool_before_replacing_it(monkeypatch):
    from forge_core.testing import pytest_plugin

    class _Pool:
        def __init__(self, world_size: int) -> None:
            self.alive, self.closed = True, False

        def close(self) -> None:
            self.closed = True

    monkeypatch.setattr(pytest_plugin, "WorkerPool", _Pool)
    pools = pytest_plugin.PoolSet()
    broken = pools(2)
    broken.alive = False
    assert pools(2) is not broken
    assert broken.closed
