"""The held-out loss: mean next-token cross-entropy per predicted token over a fixed set of
batches (of the validation set; the loop labels it when there is none and it reads training
batches). Also the input-token count of a batch, which throughput and MFU count.

Each evaluation reads through a loader of its own, from the start. What a run keeps between
them is the data it evaluates on (:func:`evaluation_data`): for streamed VLM shards with
``data.decode_workers``, one pool of decode worker processes that each evaluation's loader
borrows and gives back, stopped at the end of the run (:func:`close_evaluation_data`), instead
of ``N`` processes started and stopped every ``train.eval_every`` steps."""

from __future__ import annotations

import torch

from forge_train.config import DataConfig
from forge_train.data import build_loader
from forge_train.distributed import all_reduce
from forge_train.step import StepRunner

__all__ = ["close_evaluation_data", "evaluation_data", "held_out_loss", "input_tokens"]


def input_tokens(micro_batches: list[dict[str, torch.Tensor]]) -> int:
    """Non-padding input positions of collated micro-batches (``document_ids`` is -1 on a
    row's padding): the tokens the model processes, which throughput and MFU count. The loss
    counts only the predicted ones (for SFT with assistant-only loss, a fraction of them)."""
    total = 0
    for mb in micro_batches:
        documents = mb.get("document_ids")
        total += int((documents >= 0).sum()) if documents is not None else mb["input_ids"].numel()
    return total


def evaluation_data(dataset):
    """``dataset`` as a run's evaluations read it, one after another: a streamed VLM split
    (``VLMShardData``) with decode workers as a copy whose loaders share one pool of them
    (``VLMShardData.sharing_decode_workers``); anything else as it is. Close it with
    :func:`close_evaluation_data` at the end of the run."""
    share = getattr(dataset, "sharing_decode_workers", None)
    return share() if share is not None else dataset


def close_evaluation_data(data) -> None:
    """Stop the decode workers an :func:`evaluation_data` kept for the run (if any); the
    dataset itself (which training may read too) is left as it is."""
    pools = getattr(data, "decode_pools", None)
    if pools is not None:
        pools.close()


@torch.no_grad()
def held_out_loss(
    runner: StepRunner,
    dataset,
    config: DataConfig,
    *,
    batches: int,
    seed: int,
    dp_rank: int,
    dp_size: int,
    pad_id: int,
) -> float | None:
    """Mean next-token cross-entropy per predicted token over ``batches`` global batches of ``dataset``, read in
    order from the start (the same batches every time); ``None`` when ``batches`` is 0. The
    loader is closed at the end (a streaming loader's prefetch thread stops, its decode
    workers stop or go back to :func:`evaluation_data`'s pool)."""
    if batches == 0:
        return None
    loader = build_loader(
        dataset, config, seed=seed, dp_rank=dp_rank, dp_size=dp_size, pad_id=pad_id, shuffle=False
    )
    runner.model.eval()
    total = torch.zeros(2, device=runner.device)
    try:
        for _ in range(batches):
            total += runner.eval_sums(next(loader))
    finally:
        close = getattr(loader, "close", None)
        if close is not None:
            close()
    runner.model.train()
    total = all_reduce(total, runner.dp_group)
    return float(total[0] / total[1].clamp(min=1))
