"""What a run has done: the loop counters saved with each checkpoint, and the result of
:func:`forge_train.train`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Progress", "TrainResult"]


class Progress:
    """Loop counters saved with the checkpoint (a stateful object for forge-ckpt)."""

    def __init__(self) -> None:
        self.step = 0
        self.tokens = 0
        self.skipped: list[int] = []

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "skipped": list(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.skipped[:] = [int(s) for s in state["skipped"]]  # in place: the guard holds it


@dataclass
class TrainResult:
    """What :func:`forge_train.train` returns: losses of the steps this process ran, held-out
    losses before and after, why it stopped early (``"SIGTERM"``, ``"max_minutes"``) and the
    paths it wrote."""

    run_dir: Path
    losses: list[float] = field(default_factory=list)
    start_step: int = 0
    steps_done: int = 0
    initial_eval: float | None = None
    final_eval: float | None = None
    stopped: str | None = None
    checkpoint: Path | None = None
    hf_dir: Path | None = None
    tokens_per_s: float | None = None
    skipped_steps: list[int] = field(default_factory=list)
    profile_traces: list[Path] = field(default_factory=list)
