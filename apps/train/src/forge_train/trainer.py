"""``train(cfg)``: one run in this process (one rank under ``torchrun``).

The pieces, one concept per module:

- :mod:`forge_train.loop`: the loop of one rank (resume, steps, evaluation, checkpoints,
  export); :mod:`forge_train.components`: what it trains with (data, model, LoRA, FP8,
  parallelization, optimizer);
- :mod:`forge_train.step`: one optimizer step (gradient accumulation, loss normalization,
  clipping, the guarded update); :mod:`forge_train.guards`: the NaN/Inf guard;
  :mod:`forge_train.expert_balance`: the MoE expert-bias update;
- :mod:`forge_train.preemption`: SIGTERM and time limits; :mod:`forge_train.progress`: loop
  counters and :class:`TrainResult`; :mod:`forge_train.rundir`: the run folder;
- :mod:`forge_train.metrics`, :mod:`forge_train.trackers`, :mod:`forge_train.profiling`,
  :mod:`forge_train.throughput`: what a run reports.
"""

from __future__ import annotations

import torch.distributed as dist

from forge_train.config import RunConfig
from forge_train.guards import NonFiniteError
from forge_train.progress import TrainResult

__all__ = ["NonFiniteError", "TrainResult", "train"]


def train(cfg: RunConfig) -> TrainResult:
    """Run ``cfg`` in this process (under ``torchrun``: as one rank of the job).

    Initializes ``torch.distributed`` (gloo on CPU, nccl on CUDA) unless the caller already
    did, and shuts it down again only in that case.
    """
    from forge_core import init_distributed, shutdown_distributed
    from forge_train.loop import Trainer

    owns_group = not dist.is_initialized()
    if owns_group:
        init_distributed()
    trainer = None
    finished = False
    try:
        trainer = Trainer(cfg)
        result = trainer.run()
        finished = True
        return result
    finally:
        if trainer is not None:
            trainer.close()
        if owns_group:
            shutdown_distributed(barrier=finished)  # no barrier the other ranks may never reach
