"""Launcher environment parsing, single-process init, and a real torchrun launch."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch.distributed as dist

from forge_core import init_distributed, read_launch_env, shutdown_distributed

TORCHRUN_ENV = {
    "RANK": "3",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "10.0.0.1",
    "MASTER_PORT": "29400",
}


def test_no_launcher_means_one_process():
    env = read_launch_env({})
    assert (env.rank, env.world_size, env.launched, env.is_main) == (0, 1, False, True)


def test_torchrun_variables_are_read():
    env = read_launch_env(TORCHRUN_ENV)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 8, 1, 2)
    assert (env.master_addr, env.master_port, env.launched) == ("10.0.0.1", 29400, True)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"WORLD_SIZE": None}, "WORLD_SIZE is not set but RANK is"),
        ({"RANK": None}, "RANK is not set but WORLD_SIZE is"),
        ({"RANK": "8"}, "RANK=8 is outside [0, WORLD_SIZE=8)"),
        ({"RANK": "x"}, "RANK='x' is not an integer"),
        ({"WORLD_SIZE": "0", "RANK": "0"}, "WORLD_SIZE must be >= 1"),
        ({"LOCAL_RANK": "2"}, "LOCAL_RANK=2 is outside [0, LOCAL_WORLD_SIZE=2)"),
        ({"LOCAL_WORLD_SIZE": "3"}, "WORLD_SIZE=8 is not a multiple of LOCAL_WORLD_SIZE=3"),
        ({"LOCAL_WORLD_SIZE": "16"}, "LOCAL_WORLD_SIZE=16 must be between 1 and WORLD_SIZE=8"),
        ({"MASTER_ADDR": None}, "MASTER_ADDR is not set but WORLD_SIZE=8"),
        ({"MASTER_PORT": None}, "MASTER_PORT is not set but WORLD_SIZE=8"),
        ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a valid TCP port"),
        (
            {"LOCAL_RANK": None, "LOCAL_WORLD_SIZE": None},
            "LOCAL_RANK is not set but WORLD_SIZE=8",
        ),
    ],
)
def test_inconsistent_environments_are_explained(changes, message):
    environ = {**TORCHRUN_ENV, **changes}
    environ = {k: v for k, v in environ.items() if v is not None}
    with pytest.raises(ValueError, match=re.escape(message)):
        read_launch_env(environ)


def test_local_rank_is_derived_per_node_when_only_local_world_size_is_set():
    environ = {**TORCHRUN_ENV, "RANK": "5", "LOCAL_WORLD_SIZE": "4"}
    del environ["LOCAL_RANK"]
    env = read_launch_env(environ)
    assert (env.local_rank, env.local_world_size) == (1, 4)  # second node, not RANK=5


def test_rank_zero_of_one_without_master_addr_runs_alone(monkeypatch):
    for key in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not dist.is_initialized()
    try:
        env = init_distributed()  # os.environ: env:// would need MASTER_ADDR
        assert (env.rank, env.world_size, env.local_rank, env.launched) == (0, 1, 0, True)
        assert dist.get_world_size() == 1
    finally:
        shutdown_distributed()


def test_single_process_init_and_shutdown():
    assert not dist.is_initialized()
    try:
        env = init_distributed(environ={})
        assert env.world_size == 1
        assert dist.get_world_size() == 1
        assert dist.get_backend() == "gloo"
        assert init_distributed(environ={}) == env  # idempotent
        with pytest.raises(RuntimeError, match="already exists with rank 0 of 1"):
            init_distributed(environ={**TORCHRUN_ENV})
    finally:
        shutdown_distributed()
    assert not dist.is_initialized()
    shutdown_distributed()  # no-op when nothing is initialised


def test_shutdown_frees_groups_held_by_reference_cycles():
    # A group kept alive only by a cycle must be freed by shutdown, while the interpreter is
    # whole, not by a later collection or at finalization (where gloo can abort the process).
    import gc
    import weakref

    class Holder:
        pass

    init_distributed(environ={})
    gc_was_enabled = gc.isenabled()
    gc.disable()  # the automatic collector must not do the work this test checks
    try:
        holder = Holder()
        holder.cycle = holder
        holder.group = dist.new_group([0])
        alive = weakref.ref(holder)
        del holder
        assert alive() is not None
        shutdown_distributed()
        assert alive() is None, "a group held by a reference cycle outlived shutdown_distributed"
    finally:
        if gc_was_enabled:
            gc.enable()
        shutdown_distributed()


@pytest.mark.multiprocess
def test_torchrun_launch_end_to_end(tmp_path):
    # The job keeps its process-group holders (the mesh, the collective's autograd graph) in a
    # function, so they are freed before interpreter finalization: a gloo group destroyed while
    # the interpreter shuts down can abort the process at exit ("terminate called without an
    # active exception", seen rarely with module-level holders). Faulthandler dumps every
    # thread's stack if a rank still aborts, and the failure message shows both streams.
    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent(
            """
        import torch, torch.distributed as dist
        from forge_core import ParallelDims, init_distributed, shutdown_distributed
        from forge_core.collectives import all_reduce


        def main():
            env = init_distributed()
            mesh = ParallelDims(world_size=env.world_size, tp=2).build_mesh()
            x = torch.tensor([float(env.rank + 1)], requires_grad=True)
            y = all_reduce(x, group=mesh["tp"])
            y.backward()
            print(f"rank={env.rank} local={env.local_rank} world={env.world_size} "
                  f"sum={y.item()} grad={x.grad.item()}", flush=True)
            del y, x, mesh
            shutdown_distributed()


        main()
        """
        )
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},
    )
    assert result.returncode == 0, (
        f"stdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-6000:]}"
    )
    for rank in (0, 1):
        assert f"rank={rank} local={rank} world=2 sum=3.0 grad=2.0" in result.stdout
