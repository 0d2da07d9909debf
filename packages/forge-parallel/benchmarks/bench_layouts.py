"""Benchmark parallel layouts on CPU (gloo): step time, training-state bytes and communication.

    python packages/forge-parallel/benchmarks/bench_layouts.py --ranks 2
    python packages/forge-parallel/benchmarks/bench_layouts.py --ranks 4 --dim 256 --layers 4

For each layout, on the worker pool of ``--ranks`` gloo ranks, the test suite's TinyLlama
(``tests/tiny_models.py``; width ``--dim``) trains ``--steps`` timed steps of 2 micro-batches
(AdamW, clipping) after one warm-up step, next to the single process doing the same global
batch. Printed per layout (rank 0):

- ``step ms`` and ``x single``: median step time, and its ratio to the single process;
- ``state MiB`` and ``x single``: bytes this rank holds for parameters + gradients + optimizer
  state after the backward of a step (what ZeRO / FSDP shard), and the ratio;
- ``peak MiB`` and ``x single``: the peak during one step of the bytes of live tensors (state
  held at the start of the step plus every storage the dispatcher allocates in it, freed when
  it dies): what the rank needs for the step. Buffers that collectives or FSDP allocate outside
  the dispatcher (gloo's own, storage resizes) are not seen;
- ``comm MiB/step``: payload of the collectives this rank joined in one step (the full size of
  the tensor all-gathered / reduce-scattered / all-reduced, counted from ``torch.distributed``
  calls and DTensor's functional collectives), next to ``analytic``: the textbook payload with
  ``P`` = parameter bytes and ``A`` = 2 micro-batches: DDP ``P`` (one all-reduce, no sync
  during accumulation), ZeRO-1 ``2P`` (reduce-scatter + all-gather), ZeRO-2 ``(A+1)P``
  (reduce-scatter every micro-batch), FSDP ``(2A+1)P`` (all-gather in forward and again in
  backward per micro-batch, one reduce-scatter), HSDP (``--ranks 4``: 2 replicas of 2 shards)
  ``(2A+1)P`` within a replica plus an all-reduce of the ``P / 2`` shard across replicas, TP:
  Megatron's 4 all-reduces of ``B·S·D``
  activations per layer per micro-batch (2 forward, 2 backward), TP+SP: 4 all-gathers and 4
  reduce-scatters of ``B·S·D`` instead (each moves half an all-reduce's bytes); not counting
  the embedding and the head.

CPU timings on a shared machine are noisy and say nothing about a GPU; the byte counts are
exact. Communication on CPU is gloo over shared memory.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import forge_parallel
from forge_core import ParallelDims

ACCUM, BATCH, SEQ = 2, 8, 64


def _helpers():
    name = "forge_parallel_tests_tiny_models"
    if name not in sys.modules:
        path = Path(__file__).parents[1] / "tests" / "tiny_models.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


_FUNCOLS = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single")


class _CommCounter(TorchDispatchMode):
    """Counts DTensor's functional collectives (tensor parallelism)."""

    def __init__(self, totals: dict[str, int]) -> None:
        super().__init__()
        self.totals = totals

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, _, op = str(func.overloadpacket).rpartition(".")
        if namespace.endswith("_c10d_functional") and op in _FUNCOLS:
            size = args[0].numel() * args[0].element_size()
            if op == "all_gather_into_tensor":
                size *= args[1]  # (input, group_size, group_name)
            self.totals[op] = self.totals.get(op, 0) + size
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _count_comm(totals: dict[str, int]):
    """Count the payload of torch.distributed collectives (FSDP, DDP, ZeRO) and funcols."""
    patched = {}

    def nbytes(t):
        return t.numel() * t.element_size()

    sizes = {  # name -> (positional index, keyword) of the full-size tensor
        "all_reduce": (0, "tensor"),
        "all_gather_into_tensor": (0, "output_tensor"),
        "all_gather_single": (0, "output_tensor"),
        "reduce_scatter_tensor": (1, "input"),
        "reduce_scatter_single": (1, "input"),
    }
    for name, (index, keyword) in sizes.items():
        if not hasattr(dist, name):
            continue
        original = getattr(dist, name)

        def counted(*args, _name=name, _i=index, _k=keyword, _f=original, **kwargs):
            tensor = args[_i] if len(args) > _i else kwargs[_k]
            key = _name.replace("_single", "_into_tensor" if "gather" in _name else "_tensor")
            totals[key] = totals.get(key, 0) + nbytes(tensor)
            return _f(*args, **kwargs)

        patched[name] = original
        setattr(dist, name, counted)
    try:
        with _CommCounter(totals):
            yield
    finally:
        for name, original in patched.items():
            setattr(dist, name, original)


class _PeakMemory(TorchDispatchMode):
    """Peak bytes of the storages allocated by the ops run inside (freed when they die)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.sizes: dict[int, int] = {}

    def _free(self, ptr: int) -> None:
        self.live -= self.sizes.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            try:
                storage = getattr(t, "_local_tensor", t).untyped_storage()
                ptr = storage.data_ptr()
            except RuntimeError:  # a subclass without a storage of its own
                continue
            if ptr == 0 or ptr in self.sizes:
                continue
            self.sizes[ptr] = storage.nbytes()
            self.live += self.sizes[ptr]
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, ptr)
        return out


def _state_bytes(model, opt) -> int:
    """Bytes of the distinct storages behind parameters, gradients and optimizer state."""
    tensors = list(model.parameters()) + [p.grad for p in model.parameters()]
    inner = opt
    if isinstance(opt, forge_parallel.ZeroOptimizer):  # owned shards and their gradients
        inner = opt.optimizer
        shards = [p for g in inner.param_groups for p in g["params"]]
        tensors += shards + [p.grad for p in shards]
    tensors += [
        v for st in inner.state.values() for v in st.values() if isinstance(v, torch.Tensor)
    ]
    storages = {}
    for t in tensors:
        if t is None or t.dim() == 0:
            continue
        t = t.to_local() if isinstance(t, DTensor) else t
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _run(model, result, batches, dp_size, dp_rank):
    opt = (
        result.build_optimizer(torch.optim.AdamW, lr=1e-3)
        if result is not None
        else torch.optim.AdamW(model.parameters(), lr=1e-3)
    )
    times, comm, state, peak = [], {}, 0, 0
    for step, micro in enumerate(batches):
        totals: dict[str, int] = {}
        if step == 1:  # measured, not timed
            memory = _PeakMemory()
            held = _state_bytes(model, opt)
        start = time.perf_counter()
        measure = contextlib.ExitStack()
        if step == 1:
            measure.enter_context(_count_comm(totals))
            measure.enter_context(memory)
        with measure:
            for i, tokens in enumerate(micro):
                rows = tokens.chunk(dp_size)[dp_rank]
                last = i == len(micro) - 1
                sync = contextlib.nullcontext() if last or result is None else result.no_sync()
                loss_ctx = result.loss_context() if result else contextlib.nullcontext()
                with sync, loss_ctx:
                    logits = model(rows[:, :-1])
                    loss = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten()) / ACCUM
                    loss.backward()
            if isinstance(opt, forge_parallel.ZeroOptimizer):
                opt.clip_grad_norm_(1.0)
            else:
                forge_parallel.clip_grad_norm_(model.parameters(), 1.0)
            if step == 1:
                state = _state_bytes(model, opt)
            opt.step()
            opt.zero_grad()
        if step > 1:
            times.append(time.perf_counter() - start)
        if step == 1:
            comm = totals
            peak = held + memory.peak
    return statistics.median(times), state, peak, comm


LAYOUTS = {
    "ddp": {"dims": {"dp_replicate": -1, "dp_shard": 1}, "data_parallel": "ddp"},
    "zero1": {"dims": {}, "data_parallel": "zero1"},
    "zero2": {"dims": {}, "data_parallel": "zero2"},
    "fsdp": {"dims": {}, "data_parallel": "fsdp"},
    "fsdp+recompute": {"dims": {}, "recompute": forge_parallel.RecomputeConfig()},
    "tp": {"dims": {"tp": -1, "dp_shard": 1}, "plan": "tp"},
    "tp+sp": {"dims": {"tp": -1, "dp_shard": 1}, "plan": "tp+sp"},
}


def _job(dim: int, layers: int, steps: int):
    tm = _helpers()
    torch.manual_seed(0)
    heads = max(2, dim // 32)
    cfg = {
        "dim": dim,
        "n_layers": layers,
        "n_heads": heads,
        "n_kv_heads": heads,
        "ffn": 4 * dim,
        "vocab": 1024,
    }
    gen = torch.Generator().manual_seed(0)
    batches = [
        [torch.randint(0, 1024, (BATCH, SEQ + 1), generator=gen) for _ in range(ACCUM)]
        for _ in range(steps + 2)
    ]
    base = tm.build_tiny(**cfg)
    param_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    single = _run(copy.deepcopy(base), None, batches, 1, 0)
    world = dist.get_world_size()
    rows = {"single": (*single, param_bytes)}
    layouts = dict(LAYOUTS)
    if world >= 4 and world % 2 == 0:
        layouts["hsdp"] = {"dims": {"dp_replicate": 2}, "data_parallel": "hsdp"}
    for name, layout in layouts.items():
        kwargs = dict(layout)
        dims = ParallelDims(world_size=world, **kwargs.pop("dims"))
        if kwargs.get("plan"):
            kwargs["plan"] = tm.tiny_plan(sequence_parallel=kwargs["plan"] == "tp+sp")
        result = forge_parallel.parallelize(copy.deepcopy(base), dims, **kwargs)
        mesh = result.mesh
        rows[name] = (
            *_run(result.model, result, batches, mesh["dp"].size(), mesh["dp"].get_local_rank()),
            param_bytes,
        )
    return rows


def _analytic(name: str, p: int, dim: int, layers: int, world: int) -> float | None:
    if name == "ddp":
        return p
    if name == "zero1":
        return 2 * p
    if name == "zero2":
        return (ACCUM + 1) * p
    if name.startswith("fsdp"):
        return (2 * ACCUM + 1) * p
    if name == "hsdp":  # 2 replicas: all-reduce of the P / (world / 2) shard across them
        return (2 * ACCUM + 1) * p + p / (world // 2)
    if name.startswith("tp"):  # per layer: 4 all-reduces, or 4 all-gathers + 4 reduce-scatters
        per_layer = 8 if name == "tp+sp" else 4
        return per_layer * layers * BATCH * SEQ * dim * 4 * ACCUM
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    from forge_core.testing import WorkerPool

    with WorkerPool(args.ranks) as pool:
        rows = pool.run(_job, args.dim, args.layers, args.steps, timeout=3000)[0]
    mib = 2**20
    t0, s0, m0 = rows["single"][0], rows["single"][1], rows["single"][2]
    print(
        f"ranks={args.ranks} dim={args.dim} layers={args.layers} "
        f"params={rows['single'][4] / mib:.2f} MiB micro-batches={ACCUM}x{BATCH}x{SEQ} tokens "
        f"(global), torch {torch.__version__}"
    )
    print(
        f"{'layout':16s} {'step ms':>8s} {'x single':>8s} {'state MiB':>10s} {'x single':>8s} "
        f"{'peak MiB':>9s} {'x single':>8s} {'comm MiB/step':>14s} {'analytic':>9s}  "
        "collectives (MiB)"
    )
    for name, (t, state, peak, comm, p) in rows.items():
        total = sum(comm.values()) if isinstance(comm, dict) else 0
        analytic = _analytic(name, p, args.dim, args.layers, args.ranks)
        detail = " ".join(f"{k}={v / mib:.2f}" for k, v in sorted(comm.items())) if comm else "-"
        expected = "-" if analytic is None else f"{analytic / mib:9.2f}"
        print(
            f"{name:16s} {t * 1e3:8.1f} {t / t0:8.2f} {state / mib:10.2f} {state / s0:8.2f} "
            f"{peak / mib:9.2f} {peak / m0:8.2f} {total / mib:14.2f} {expected:>9s}  {detail}"
        )


if __name__ == "__main__":
    main()
