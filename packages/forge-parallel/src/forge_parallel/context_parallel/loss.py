"""The loss of a sequence sharded across context-parallel ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from forge_core.collectives import GroupLike, all_reduce, as_process_group

__all__ = ["context_parallel_cross_entropy"]


def context_parallel_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    group: GroupLike,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean token cross-entropy over the *full* sequences, from this rank's shard.

    ``logits`` (..., V) and ``labels`` (...) are this rank's tokens. Returns, on every rank of
    the context-parallel ``group``, ``sum of all ranks' token losses / all ranks' counted
    tokens`` (tokens labelled ``ignore_index`` excluded): the single-process mean, even when
    the ranks count different numbers of tokens.

    Gradients follow the convention of :mod:`forge_core.collectives` (the job's objective is
    the sum of the ranks' losses, here ``cp`` times the mean), which data parallelism that
    *averages* gradients over ``dp_shard x cp`` (FSDP / HSDP of :func:`forge_parallel.parallelize`)
    turns back into the gradient of the mean.
    """
    pg = as_process_group(group)
    token_loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="sum",
    )
    count = (labels != ignore_index).sum().to(token_loss.dtype)
    count = all_reduce(count.detach(), group=pg)
    if count.item() == 0:
        raise ValueError(
            f"every label of the sequence on all context-parallel ranks is ignore_index="
            f"{ignore_index}: the mean loss is undefined; drop the batch or keep some labels"
        )
    return all_reduce(token_loss, group=pg) / count
