"""The run folder: ``train.output_dir``, else ``runs/<date>-<time>`` (one name for all ranks)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import torch.distributed as dist

from forge_train.config import RunConfig

__all__ = ["resolve_run_dir"]


def resolve_run_dir(cfg: RunConfig) -> Path:
    """The run folder of ``cfg``; rank 0's clock names it (collective when there are ranks)."""
    if cfg.train.output_dir is not None:
        return Path(cfg.train.output_dir)
    stamp = [datetime.now().strftime("%Y%m%d-%H%M%S")]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(stamp, src=0)
    return Path("runs") / stamp[0]
