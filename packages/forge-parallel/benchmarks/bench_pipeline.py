"""Pipeline bubble per schedule on CPU (gloo): computed next to measured.

    python packages/forge-parallel/benchmarks/bench_pipeline.py --ranks 2
    python packages/forge-parallel/benchmarks/bench_pipeline.py --ranks 4 --microbatches 8

On the worker pool of ``--ranks`` gloo ranks (all of them pipeline ranks), the test suite's
TinyLlama (``tests/tiny_models.py``; width ``--dim``, ``--layers`` blocks) is split into
stages and trained ``--steps`` timed steps (after one warm-up step) with each schedule. Printed
per schedule (rank 0):

- ``computed``: :func:`forge_parallel.pipeline.bubble_fraction` with equal forward,
  input-gradient and weight-gradient times (GPipe/1F1B ``(p-1)/(m+p-1)``, interleaved
  ``(p-1)/(vm+p-1)``, ZB-H1 ``(p-1)/(3m+p-1)``, ZB-V 0);
- ``measured``: 1 - (time a rank spends in stage forward/backward calls) / (step wall time),
  averaged over ranks, and the worst rank (:func:`forge_parallel.pipeline.measure_bubble`);
- ``step ms``: wall time of one step.

Measured values include what the formulas leave out: point-to-point transfers (gloo, shared
memory), the schedule's own bookkeeping, unequal F/B/W times (on CPU a weight-gradient pass is
not as long as a forward) and, on a shared machine, other processes. They are indicative only.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from forge_core import ParallelDims
from forge_parallel.pipeline import measure_bubble, pipeline

SCHEDULES = (
    ("gpipe", 1),
    ("1f1b", 1),
    ("interleaved_1f1b", 2),
    ("zero_bubble", 1),
    ("zbv", 2),
)


def _helpers():
    name = "forge_parallel_tests_tiny_models"
    if name not in sys.modules:
        path = Path(__file__).parents[1] / "tests" / "tiny_models.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def _run(args: dict) -> list[dict]:
    tm = _helpers()
    torch.set_num_threads(1)
    world = dist.get_world_size()
    mesh = ParallelDims(world_size=world, pp=world, dp_shard=1).build_mesh("cpu")
    gen = torch.Generator().manual_seed(0)
    m = args["microbatches"]
    tokens = torch.randint(0, 256, (m * args["rows"], args["seq"] + 1), generator=gen)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    rows = []
    for schedule, v in SCHEDULES:
        model = tm.build_tiny(
            vocab=256, dim=args["dim"], ffn=4 * args["dim"], n_layers=args["layers"]
        )
        pipe = pipeline(
            model, mesh, loss_fn=_loss, schedule=schedule, microbatches=m, virtual_stages=v
        )
        del model
        report = measure_bubble(pipe, inputs, labels, steps=args["steps"])
        rows.append(
            {
                "schedule": schedule,
                "v": v,
                "computed": report.computed,
                "measured": report.measured,
                "worst": max(report.per_rank),
                "step_ms": report.step_seconds * 1e3,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--rows", type=int, default=2, help="rows per micro-batch")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    from forge_core.testing import WorkerPool

    with WorkerPool(args.ranks) as pool:
        rows = pool.run(_run, vars(args), timeout=1800)[0]
    print(
        f"pp={args.ranks} microbatches={args.microbatches} layers={args.layers} dim={args.dim} "
        f"seq={args.seq} rows/microbatch={args.rows} (CPU, gloo)"
    )
    print(
        f"{'schedule':18s} {'v':>2s} {'computed':>9s} {'measured':>9s} {'worst':>7s} {'step ms':>9s}"
    )
    for r in rows:
        print(
            f"{r['schedule']:18s} {r['v']:>2d} {r['computed']:>9.3f} {r['measured']:>9.3f} "
            f"{r['worst']:>7.3f} {r['step_ms']:>9.1f}"
        )


if __name__ == "__main__":
    main()
