"""``logging.profile``: a ``torch.profiler`` window over a few training steps, saved as a Chrome
trace (``trace_rank<r>_steps<a>-<b>.json``; open it in https://ui.perfetto.dev or
chrome://tracing).

The window is a ``torch.profiler.schedule``: idle steps until one step before the window
(warm-up, whose events are dropped), then ``num_steps`` recorded steps; the trace is written
when the last one ends. Steps are numbered as in ``metrics.jsonl`` (from 1), so a resumed run
profiles what is left of the window.
"""

from __future__ import annotations

from pathlib import Path

import torch

from forge_train.config import ProfileConfig

__all__ = ["ProfileWindow"]


class ProfileWindow:
    """Call :meth:`step` after each training step inside ``with ProfileWindow(...)``; a no-op
    when the window is off or already past."""

    def __init__(
        self,
        config: ProfileConfig,
        *,
        default_dir: Path,
        first_step: int,
        rank: int,
        device: torch.device,
    ) -> None:
        """``first_step``: the number of the first step this process runs (1 on a fresh run)."""
        self.traces: list[Path] = []
        self._profiler = None
        if config.start_step is None:
            return
        before = config.start_step - first_step  # steps to run before the window opens
        active = config.num_steps + min(before, 0)
        if active <= 0:
            return
        self.first = max(config.start_step, first_step)
        self.last = self.first + active - 1
        self.path = Path(config.output_dir or default_dir) / (
            f"trace_rank{rank}_steps{self.first}-{self.last}.json"
        )
        warmup = min(1, max(before, 0))
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profiler = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(
                wait=max(before, 0) - warmup, warmup=warmup, active=active, repeat=1
            ),
            on_trace_ready=self._save,
            record_shapes=config.record_shapes,
            profile_memory=config.profile_memory,
            with_stack=config.with_stack,
        )

    def _save(self, profiler) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(self.path))
        self.traces.append(self.path)

    def __enter__(self) -> ProfileWindow:
        if self._profiler is not None:
            self._profiler.__enter__()
        return self

    def step(self) -> None:
        """One training step ended."""
        if self._profiler is not None:
            self._profiler.step()

    def __exit__(self, *exc) -> None:
        if self._profiler is not None:
            self._profiler.__exit__(*exc)
            self._profiler = None
