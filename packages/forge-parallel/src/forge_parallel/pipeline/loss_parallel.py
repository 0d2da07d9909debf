"""The loss on vocab-sharded logits (``"loss_parallel"`` head) at the end of a pipeline.

With tensor parallelism on the stages, the last stage's head may keep the logits sharded over
the vocabulary (Megatron-LM's vocab-parallel cross entropy, Shoeybi et al. 2019,
arXiv:1909.08053; torch's ``loss_parallel``): ``cross_entropy`` on such DTensor logits must run,
forward *and* backward, inside ``torch.distributed.tensor.parallel.loss_parallel()``. The
schedule computes the loss of each micro-batch in its forward and back-propagates it in a later
backward, so :func:`in_loss_context` runs the whole schedule step inside it when any stage's
plan shards the logits. The per-micro-batch loss values handed back to the caller are plain
tensors (:func:`loss_value`), like those of a replicated head.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch.distributed.tensor import DTensor

__all__ = ["in_loss_context", "loss_value"]

R = TypeVar("R")


def in_loss_context(run: Callable[..., R], parallelized: Sequence[Any]) -> Callable[..., R]:
    """``run`` inside ``loss_parallel()`` when a stage's ``ParallelizeResult`` shards the logits
    by vocabulary (its plan has a ``"loss_parallel"`` head), else ``run`` itself."""
    if not any(getattr(result, "loss_parallel", False) for result in parallelized):
        return run
    from torch.distributed.tensor.parallel import loss_parallel

    @functools.wraps(run)
    def wrapped(*args: Any, **kwargs: Any) -> R:
        with loss_parallel():
            return run(*args, **kwargs)

    return wrapped


def loss_value(loss: torch.Tensor) -> torch.Tensor:
    """A detached plain tensor of ``loss`` (a replicated DTensor under loss parallelism)."""
    loss = loss.detach()
    return loss.full_tensor() if isinstance(loss, DTensor) else loss
