"""Distributed training checkpoints: atomic, asynchronous, resharding on load, pickle-free.

- :class:`CheckpointManager` / :class:`CheckpointConfig`: save and resume model, optimizer,
  LR scheduler, data loader and RNG states through ``torch.distributed.checkpoint``.
- :class:`RNGState`: the process's random generators as a stateful object.
- :mod:`.layout`: the on-disk layout and its completion marker.
"""

from forge_ckpt.training.config import CheckpointConfig
from forge_ckpt.training.layout import CheckpointInfo, list_checkpoints
from forge_ckpt.training.manager import CheckpointManager, LoadResult
from forge_ckpt.training.rng import RNGState

__all__ = [
    "CheckpointConfig",
    "CheckpointInfo",
    "CheckpointManager",
    "LoadResult",
    "RNGState",
    "list_checkpoints",
]
