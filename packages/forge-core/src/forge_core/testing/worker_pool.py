"""A pool of gloo worker processes that stays alive across tests.

Starting ranks costs seconds (spawn, import torch, rendezvous), so the suite starts each world
size once and sends it one job per test. A job is a module-level function of a test file;
every rank runs it with the same arguments inside an initialised default process group and
returns a picklable result::

    def _check_all_reduce(scale):
        x = torch.ones(2) * (dist.get_rank() + 1) * scale
        return forge_core.collectives.all_reduce(x)

    def test_all_reduce(dist_pool):
        results = dist_pool(4).run(_check_all_reduce, 2.0)   # one result per rank

Arguments and results are pickled eagerly (``ForkingPickler``, as the queues would): an
argument that cannot be pickled raises ``TypeError`` in ``run`` naming it, and a result that
cannot (a tensor that requires grad, a lambda) fails the job at once instead of being lost and
blamed on a hang. A worker that dies stops its pool, survivors included.
An exception on any rank fails the job with that rank's traceback. A rank that hangs (for
example, waiting in a collective that a failed peer never joined) makes the pool be torn down
and started afresh on next use, so one bad test does not poison the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import io
import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch.multiprocessing as mp

from forge_core.testing.modules import import_path

__all__ = ["WorkerError", "WorkerPool", "preload_in_workers"]

_STOP = None
_MODULE_PREFIX = "_forge_pool_job_"
#: Workers holding more process groups than this are restarted before the next job. Every
#: DeviceMesh a job builds adds groups, and each gloo group keeps threads polling its sockets:
#: after a few hundred jobs, thousands of threads per worker would slow the whole machine.
MAX_GROUPS_PER_WORKER = 48
# Imported once in the fork server; every worker forks from it with these already loaded, so a
# pool of 8 ranks starts in about a second instead of importing torch 8 times. The fork server
# never runs torch ops itself, so forking it is safe (unlike forking a process that has
# started OpenMP or CUDA).
_PRELOAD = [
    "torch",
    "torch.distributed",
    "torch.distributed.device_mesh",
    "torch.distributed.tensor",  # imports sympy: seconds per process, paid once here
    "torch.testing",
    "torch.distributed.checkpoint.state_dict",  # DCP: seconds per process, paid once here
    "forge_core",
    "forge_core.collectives",
    "forge_core.testing.worker_pool",
    "pytest",
]


def preload_in_workers(*modules: str) -> None:
    """Import ``modules`` in the fork server too, so that every worker, and every worker
    restarted after holding too many groups (``MAX_GROUPS_PER_WORKER``), starts with them
    loaded instead of importing them on its first job (seconds per rank for a training stack,
    paid again after each restart). Call it before the session's first pool starts (from a
    conftest, at import): the fork server reads the list when it starts. Only modules that
    import without running torch ops belong here (the server must stay safe to fork); those
    not installed are skipped."""
    _PRELOAD.extend(m for m in modules if m not in _PRELOAD)


def _dumps(obj: Any) -> bytes:
    """Pickle ``obj`` as a multiprocessing queue would (``ForkingPickler``, so tensors go
    through torch's shared-memory reducers), but now, in the caller: ``Queue.put`` pickles in
    a feeder thread that only prints a failure, so the message would be lost silently."""
    buffer = io.BytesIO()
    ForkingPickler(buffer).dump(obj)
    return buffer.getvalue()


class WorkerError(RuntimeError):
    """A job failed on one or more ranks; the message holds each failing rank's traceback."""


@dataclass(frozen=True)
class _Job:
    path: str
    qualname: str
    #: ``(args, kwargs)`` pickled eagerly by :func:`_dumps` in ``run`` (errors surface there).
    payload: bytes
    seed: int


def _load_function(path: str, qualname: str) -> Callable:
    module = import_path(path, _MODULE_PREFIX + hashlib.sha1(path.encode()).hexdigest()[:16])
    target: Any = module
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def _worker_main(rank: int, world_size: int, init_file: str, backend: str, jobs, results) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    dist.init_process_group(
        backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    results.put(("ready", rank, None, _live_groups()))
    while True:
        job = jobs.get()
        if job is _STOP:
            break
        try:
            torch.manual_seed(job.seed)
            fn = _load_function(job.path, job.qualname)
            args, kwargs = ForkingPickler.loads(job.payload)
            value = fn(*args, **kwargs)
        except BaseException:
            results.put(("error", rank, traceback.format_exc(), _live_groups()))
            continue
        try:
            message = _dumps(("ok", rank, value, _live_groups()))
        except Exception as exc:
            results.put(
                (
                    "error",
                    rank,
                    f"the result of {job.qualname} cannot be sent back: "
                    f"{type(exc).__name__}: {exc}\n(return plain data: detach tensors that "
                    "require grad, e.g. `t.detach()`, and no lambdas, locks or open files)",
                    _live_groups(),
                )
            )
            continue
        results.put(message)
    dist.destroy_process_group()


def _pickle_arguments(qualname: str, args: tuple, kwargs: dict) -> bytes:
    """Pickle a job's arguments once, here, naming the part that cannot be sent."""
    try:
        return _dumps((args, kwargs))
    except Exception as exc:
        named = [(f"argument {i}", a) for i, a in enumerate(args)]
        named += [(f"keyword argument {k!r}", v) for k, v in kwargs.items()]
        culprits = []
        for name, value in named:
            try:
                _dumps(value)
            except Exception:
                culprits.append(f"{name} ({type(value).__name__})")
        raise TypeError(
            f"the arguments of {qualname} cannot be sent to the workers: "
            f"{', '.join(culprits) or 'see the cause'} cannot be pickled "
            f"({type(exc).__name__}: {exc}); pass plain data (numbers, strings, tensors "
            "without grad) and build the rest inside the job"
        ) from exc


def _live_groups() -> int:
    """How many process groups this worker holds (every job's meshes add theirs)."""
    from torch.distributed import distributed_c10d

    return len(distributed_c10d._world.pg_map)


class WorkerPool:
    """``world_size`` ranks in one gloo process group, each waiting for jobs."""

    def __init__(
        self, world_size: int, *, backend: str = "gloo", start_timeout: float = 120.0
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.backend = backend
        self.start_timeout = start_timeout
        self.restarts = 0
        self._ctx = _worker_context()
        self._procs: list = []
        self._start()

    def _start(self) -> None:
        self._tmpdir = tempfile.TemporaryDirectory(prefix="forge_pool_")
        init_file = os.path.join(self._tmpdir.name, "rendezvous")
        self._results = self._ctx.Queue()
        self._jobs = [self._ctx.Queue() for _ in range(self.world_size)]
        self._groups = 0
        self._procs = [
            self._ctx.Process(
                target=_worker_main,
                args=(
                    rank,
                    self.world_size,
                    init_file,
                    self.backend,
                    self._jobs[rank],
                    self._results,
                ),
                daemon=True,
                name=f"forge-pool-{self.world_size}-rank{rank}",
            )
            for rank in range(self.world_size)
        ]
        for proc in self._procs:
            proc.start()
        ready = self._collect(self.start_timeout, what="start")
        if any(status != "ready" for status, _ in ready.values()):
            self.close()
            raise WorkerError("worker pool failed to start:\n" + _format_errors(ready))

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def run(
        self, fn: Callable, *args: Any, timeout: float = 300.0, seed: int = 0, **kwargs: Any
    ) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; returns the results in rank order.

        ``fn`` must be a module-level function (it is imported by file path in the workers).
        The torch RNG of every rank is seeded with ``seed`` before the call.
        """
        if not self.alive:
            raise WorkerError("the worker pool is closed (a previous job broke it)")
        if self._groups > MAX_GROUPS_PER_WORKER:
            self.close()
            self._start()
            self.restarts += 1
        qualname = getattr(fn, "__qualname__", "")
        if "<locals>" in qualname or "<lambda>" in qualname:
            raise ValueError(
                f"{qualname} is not a module-level function; workers import jobs by name, so "
                "define it at the top level of the test module"
            )
        # One pickle per rank, as the queues did: a tensor shared by file descriptor can be
        # received only once per pickle. All are made before any is sent, so a bad argument
        # raises here and the workers stay idle.
        path = inspect.getfile(fn)
        jobs = [
            _Job(path, qualname, _pickle_arguments(qualname, args, kwargs), seed)
            for _ in self._jobs
        ]
        for q, job in zip(self._jobs, jobs, strict=True):
            q.put(job)
        outcome = self._collect(timeout, what=qualname)
        errors = {r: v for r, (status, v) in outcome.items() if status != "ok"}
        if errors:
            raise WorkerError(
                f"{qualname} failed on rank(s) {sorted(errors)}:\n" + _format_errors(outcome)
            )
        return [outcome[r][1] for r in range(self.world_size)]

    def _collect(self, timeout: float, *, what: str) -> dict[int, tuple[str, Any]]:
        """Wait for one message per rank. After the first error, give the others a short grace
        period; ranks that still do not answer are presumed hung and the pool is torn down."""
        outcome: dict[int, tuple[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(outcome) < self.world_size:
            if any(status == "error" for status, _ in outcome.values()):
                deadline = min(deadline, time.monotonic() + 5.0)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                message = self._results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                dead = [p.name for p in self._procs if not p.is_alive()]
                if dead:
                    for rank in range(self.world_size):
                        outcome.setdefault(
                            rank, ("error", f"worker process died ({', '.join(dead)})")
                        )
                    # The survivors may be waiting in a collective the dead rank never joins:
                    # stop them now rather than leak them (the pool is unusable anyway).
                    self.close()
                    break
                continue
            if isinstance(message, bytes):  # an "ok" result pickled eagerly by the worker
                message = ForkingPickler.loads(message)
            status, rank, value, groups = message
            outcome[rank] = (status, value)
            self._groups = max(self._groups, groups)
        missing = [r for r in range(self.world_size) if r not in outcome]
        if missing:
            for rank in missing:
                outcome[rank] = ("error", f"no answer from rank {rank} for {what} (hung or killed)")
            self.close()
        return outcome

    def close(self) -> None:
        """Stop the workers (killing any that do not exit promptly). Idempotent."""
        if not self._procs:
            return
        for q, proc in zip(self._jobs, self._procs, strict=True):
            if proc.is_alive():
                with contextlib.suppress(OSError, ValueError):
                    q.put(_STOP)
        deadline = time.monotonic() + 5.0
        for proc in self._procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5.0)
        self._procs = []
        self._tmpdir.cleanup()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _worker_context():
    """A fork-server context preloaded with torch (falls back to spawn where unavailable)."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    preload = [m for m in _PRELOAD if importlib.util.find_spec(m.split(".")[0]) is not None]
    ctx.set_forkserver_preload(preload)
    return ctx


def _format_errors(outcome: dict[int, tuple[str, Any]]) -> str:
    parts = []
    for rank in sorted(outcome):
        status, value = outcome[rank]
        if status not in ("ok", "ready"):
            parts.append(f"--- rank {rank} ---\n{value}")
    return "\n".join(parts)
