"""The held-out loss: mean next-token cross-entropy per predicted token over a fixed set of
batches (of the validation set; the loop labels it when there is none and it reads training
batches). Also the input-token count of a batch, which throughput and MFU count."""

from __future__ import annotations

import torch

from forge_train.config import DataConfig
from forge_train.data import build_loader
from forge_train.distributed import all_reduce
from forge_train.step import StepRunner

__all__ = ["held_out_loss", "input_tokens"]


def input_tokens(micro_batches: list[dict[str, torch.Tensor]]) -> int:
    """Non-padding input positions of collated micro-batches (``document_ids`` is -1 on a
    row's padding): the tokens the model processes, which throughput and MFU count. The loss
    counts only the predicted ones (for SFT with assistant-only loss, a fraction of them)."""
    total = 0
    for mb in micro_batches:
        documents = mb.get("document_ids")
        total += int((documents >= 0).sum()) if documents is not None else mb["input_ids"].numel()
    return total


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
    order from the start (the same batches every time); ``None`` when ``batches`` is 0."""
    if batches == 0:
        return None
    loader = build_loader(
        dataset, config, seed=seed, dp_rank=dp_rank, dp_size=dp_size, pad_id=pad_id, shuffle=False
    )
    runner.model.eval()
    total = torch.zeros(2, device=runner.device)
    for _ in range(batches):
        total += runner.eval_sums(next(loader))
    runner.model.train()
    total = all_reduce(total, runner.dp_group)
    return float(total[0] / total[1].clamp(min=1))
