"""The non-finite guard: a NaN/Inf loss or gradient norm is reported with its step and either
skips the update (``train.nan_policy=skip``, at most ``train.max_nan_skips`` times) or stops
the run (``stop``). Under fp16 loss scaling a non-finite gradient norm alone is the scaler's
business (it skips that step and lowers the scale)."""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["NonFiniteError", "NonFiniteGuard"]


class NonFiniteError(RuntimeError):
    """The loss or gradient norm was NaN/Inf and ``train.nan_policy`` said stop."""


class NonFiniteGuard:
    """Decides whether a step's update may run; records skipped steps in ``skipped`` (the
    checkpointed list of :class:`forge_train.progress.Progress`)."""

    def __init__(
        self,
        *,
        policy: str,
        max_skips: int,
        skipped: list[int],
        report: Callable[[str], None],
        loss_scaling: bool,
    ) -> None:
        self.policy = policy
        self.max_skips = max_skips
        self.skipped = skipped
        self.report = report
        self.loss_scaling = loss_scaling

    def allows(self, step: int, loss: float, grad_norm: float) -> bool:
        """``True``: apply the update; ``False``: skip it (recorded and reported). Raises
        :class:`NonFiniteError` under ``stop`` or past ``max_skips`` skips."""
        values = {"loss": loss, "grad norm": grad_norm}
        bad = [name for name, value in values.items() if not math.isfinite(value)]
        if not bad or (self.loss_scaling and bad == ["grad norm"]):
            return True
        what = " and ".join(f"{name} ({values[name]})" for name in bad)
        report = f"step {step}: non-finite {what}"
        if self.policy == "stop":
            raise NonFiniteError(f"{report}; stopping (train.nan_policy=stop)")
        self.skipped.append(step)
        self.report(f"{report}; update skipped (train.nan_policy=skip)")
        if len(self.skipped) > self.max_skips:
            raise NonFiniteError(
                f"{report}: {len(self.skipped)} steps skipped (at {self.skipped}), more than "
                f"train.max_nan_skips={self.max_skips}; lower optim.lr or use precision=bf16/fp32"
            )
        return False
