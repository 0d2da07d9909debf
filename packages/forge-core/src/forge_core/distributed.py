"""Process-group set-up from the torchrun (torch elastic) environment, and clean shutdown.

Forge does not launch processes: ``torchrun`` (directly, or wrapped by SLURM / Kubernetes
launchers) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``, and :func:`init_distributed` reads them. Without them the process runs alone
(world size 1) with an in-memory store, so the same code path works in a notebook; so does
``RANK=0 WORLD_SIZE=1`` without ``MASTER_ADDR``. Without ``LOCAL_RANK`` a multi-process job
derives it as ``RANK % LOCAL_WORLD_SIZE``, or is refused when that is not set either.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from forge_core.accelerator import Accelerator
from forge_core.backends import current_accelerator

__all__ = ["DistributedEnv", "init_distributed", "read_launch_env", "shutdown_distributed"]

_REQUIRED_WITH_RANK = ("WORLD_SIZE",)


@dataclass(frozen=True, kw_only=True)
class DistributedEnv:
    """Where this process sits in the job, as the launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str | None
    master_port: int | None
    #: False when no launcher variables were found and the process runs alone.
    launched: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_var(environ: Mapping[str, str], key: str) -> int | None:
    raw = environ.get(key)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {key}={raw!r} is not an integer") from None


def read_launch_env(environ: Mapping[str, str] | None = None) -> DistributedEnv:
    """Parse and check the launcher's environment variables (``os.environ`` by default).

    Raises ``ValueError`` naming the variable when they are inconsistent.
    """
    environ = os.environ if environ is None else environ
    rank = _int_var(environ, "RANK")
    world_size = _int_var(environ, "WORLD_SIZE")
    if rank is None and world_size is None:
        return DistributedEnv(
            rank=0,
            world_size=1,
            local_rank=0,
            local_world_size=1,
            master_addr=None,
            master_port=None,
            launched=False,
        )
    if rank is None or world_size is None:
        missing = "RANK" if rank is None else "WORLD_SIZE"
        raise ValueError(
            f"{missing} is not set but {'WORLD_SIZE' if rank is None else 'RANK'} is: launch with "
            "torchrun (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or set "
            "all of them yourself"
        )
    if world_size < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size}); check the launcher")
    local_rank = _int_var(environ, "LOCAL_RANK")
    local_world_size = _int_var(environ, "LOCAL_WORLD_SIZE")
    if local_rank is None:
        # RANK is the global rank: it equals the local one on the first node only.
        if world_size == 1:
            local_rank = 0
        elif local_world_size is not None:
            local_rank = rank % max(local_world_size, 1)  # ranks are numbered node by node
        else:
            raise ValueError(
                f"LOCAL_RANK is not set but WORLD_SIZE={world_size}: the device of this process "
                "cannot be chosen (RANK is global, not per node). torchrun sets it; with another "
                "launcher set LOCAL_RANK, or LOCAL_WORLD_SIZE (processes per node) to derive it "
                "as RANK % LOCAL_WORLD_SIZE"
            )
    local_world_size = world_size if local_world_size is None else local_world_size
    if not 1 <= local_world_size <= world_size:
        raise ValueError(
            f"LOCAL_WORLD_SIZE={local_world_size} must be between 1 and WORLD_SIZE={world_size}"
        )
    if not 0 <= local_rank < local_world_size:
        raise ValueError(
            f"LOCAL_RANK={local_rank} is outside [0, LOCAL_WORLD_SIZE={local_world_size})"
        )
    if world_size % local_world_size != 0:
        raise ValueError(
            f"WORLD_SIZE={world_size} is not a multiple of LOCAL_WORLD_SIZE={local_world_size}: "
            "every node must run the same number of processes"
        )
    master_addr = environ.get("MASTER_ADDR") or None
    master_port = _int_var(environ, "MASTER_PORT")
    if world_size > 1 and (master_addr is None or master_port is None):
        missing = "MASTER_ADDR" if master_addr is None else "MASTER_PORT"
        raise ValueError(
            f"{missing} is not set but WORLD_SIZE={world_size}: the processes cannot find each "
            "other. torchrun sets it (use --rdzv-endpoint / --master-addr for multi-node runs)"
        )
    if master_port is not None and not 0 < master_port < 65536:
        raise ValueError(f"MASTER_PORT={master_port} is not a valid TCP port")
    return DistributedEnv(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        master_addr=master_addr,
        master_port=master_port,
        launched=True,
    )


def init_distributed(
    *,
    accelerator: Accelerator | None = None,
    backend: str | None = None,
    timeout: timedelta = timedelta(minutes=10),
    environ: Mapping[str, str] | None = None,
) -> DistributedEnv:
    """Initialise the default process group for this process and bind it to its device.

    ``backend`` defaults to the accelerator's (``cpu:gloo,cuda:nccl`` on CUDA, ``gloo`` on CPU,
    a plugin's own name otherwise). If the default group already exists (for example, set up
    by the caller), it is kept and its rank/world size must agree with the environment.
    Vendor environment defaults (:meth:`Accelerator.environment_defaults`) are applied to
    ``os.environ`` where unset, before the backend starts.
    """
    env = read_launch_env(environ)
    accelerator = accelerator or current_accelerator()
    if dist.is_initialized():
        if dist.get_world_size() != env.world_size or (
            env.launched and dist.get_rank() != env.rank
        ):
            raise RuntimeError(
                f"a process group already exists with rank {dist.get_rank()} of "
                f"{dist.get_world_size()}, but the environment says rank {env.rank} of "
                f"{env.world_size}; call shutdown_distributed() before initialising again"
            )
        return env
    for key, value in accelerator.environment_defaults().items():
        os.environ.setdefault(key, value)
    if accelerator.device_type != "cpu":
        accelerator.set_device(env.local_rank)
    backend = backend or accelerator.dist_backend
    # One process without a rendezvous address (RANK=0 WORLD_SIZE=1 set by hand or by a
    # launcher) needs no rendezvous: it takes the same in-memory path as an unlaunched one.
    alone = env.world_size == 1 and (env.master_addr is None or env.master_port is None)
    if env.launched and not alone:
        # env:// lets torchrun's agent share its store; an explicit mapping gets its own.
        init_method = "env://" if environ is None else _tcp_url(env.master_addr, env.master_port)
        dist.init_process_group(
            backend=backend,
            init_method=init_method,
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
        )
    else:
        dist.init_process_group(
            backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
    return env


def _tcp_url(addr: str | None, port: int | None) -> str:
    host = f"[{addr}]" if addr and ":" in addr else (addr or "127.0.0.1")
    return f"tcp://{host}:{port or 29500}"


def shutdown_distributed(*, barrier: bool = True) -> None:
    """Tear down the default process group (and every group created from it), if any.

    With ``barrier`` (the default, for a normal end) all ranks meet first: a rank that destroyed
    its groups while a peer's gloo threads still served the last collective could make that
    peer abort at exit ("terminate called without an active exception", seen with torch 2.11
    under torchrun). Pass ``barrier=False`` when leaving on an error, which the other ranks
    may never reach.

    Objects that hold a process group (a ``DeviceMesh``, the autograd graph of a collective)
    keep it alive past this call: free them before the interpreter exits (hold them in a
    function, not at module level), so that no group is destroyed during interpreter
    finalization, where gloo's threads can abort the process.
    """
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
        # A group held only by a reference cycle (an autograd graph, a mesh in a closure) would
        # otherwise wait for the collector, possibly until interpreter finalization, where its
        # gloo threads can abort the process (pytorch/pytorch#179291): free it now.
        gc.collect()
