"""Configuration of training checkpoints (:class:`~forge_ckpt.training.CheckpointManager`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CheckpointConfig"]


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Where and how often training checkpoints are written.

    Args:
        directory: folder holding one ``step_XXXXXXXX`` sub-folder per checkpoint.
        interval: save every ``interval`` steps (:meth:`CheckpointManager.should_save`);
            ``0`` saves only when asked.
        keep_last_n: keep this many newest complete checkpoints, deleting older ones after a
            new one is complete; ``None`` keeps all.
        async_save: write in a background thread while training goes on (memory cost: one CPU
            copy of this rank's shards; a new save first waits for the previous one).
        save_rng: store every rank's Python / numpy / torch / accelerator RNG states.
    """

    directory: str | os.PathLike
    interval: int = 0
    keep_last_n: int | None = None
    async_save: bool = False
    save_rng: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.directory, str | os.PathLike) or not os.fspath(self.directory):
            raise ValueError(f"directory must be a non-empty path, got {self.directory!r}")
        object.__setattr__(self, "directory", Path(self.directory))
        if (
            not isinstance(self.interval, int)
            or isinstance(self.interval, bool)
            or self.interval < 0
        ):
            raise ValueError(
                f"interval must be an integer >= 0 (0: save only when asked), got {self.interval!r}"
            )
        if self.keep_last_n is not None and (
            not isinstance(self.keep_last_n, int)
            or isinstance(self.keep_last_n, bool)
            or self.keep_last_n < 1
        ):
            raise ValueError(
                f"keep_last_n must be a positive integer or None (keep all), got "
                f"{self.keep_last_n!r}"
            )
        for name in ("async_save", "save_rng"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
