"""The held-out loss: mean cross-entropy per predicted token over a fixed set of batches."""

from __future__ import annotations

import torch

from forge_train.config import DataConfig
from forge_train.data import build_loader
from forge_train.distributed import all_reduce
from forge_train.step import StepRunner

__all__ = ["held_out_loss"]


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
    """Mean loss per predicted token over ``batches`` global batches of ``dataset``, read in
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
