"""Stand-ins for the ``wandb`` and ``mlflow`` modules that record every call, placed in
``sys.modules`` so forge_train's trackers import them instead of the real packages."""

from __future__ import annotations

import types
from typing import Any


class _WandbRun:
    def __init__(self, calls: list) -> None:
        self.calls = calls

    def log(self, values: dict[str, Any], step: int) -> None:
        self.calls.append(("log", dict(values), step))

    def finish(self) -> None:
        self.calls.append(("finish",))


def fake_wandb() -> types.ModuleType:
    """A ``wandb`` module; its ``calls`` list holds ``("init", kwargs)``, ``("log", values,
    step)`` and ``("finish",)`` in order."""
    module = types.ModuleType("wandb")
    module.calls = []

    def init(**kwargs):
        module.calls.append(("init", kwargs))
        return _WandbRun(module.calls)

    module.init = init
    return module


def fake_mlflow() -> types.ModuleType:
    """An ``mlflow`` module recording its fluent-API calls in ``calls``."""
    module = types.ModuleType("mlflow")
    module.calls = []
    for name in ("set_tracking_uri", "set_experiment", "start_run", "log_params", "end_run"):
        module.__dict__[name] = lambda *args, _name=name, **kwargs: module.calls.append(
            (_name, args, kwargs)
        )

    def log_metrics(values, step):
        module.calls.append(("log_metrics", dict(values), step))

    module.log_metrics = log_metrics
    return module
