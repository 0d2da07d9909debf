"""Experiment trackers: Weights & Biases (``logging.wandb``) and MLflow (``logging.mlflow``).

Optional: each is imported only when enabled, and a missing package raises an ``ImportError``
naming the extra to install. Both receive the resolved run config once at the start, every
metrics row (the rows of ``metrics.jsonl``: numbers only, keyed by step) and a finish call.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from forge_train.config import LoggingConfig

__all__ = ["MlflowTracker", "Tracker", "WandbTracker", "build_trackers", "flatten"]


class Tracker(Protocol):
    def log(self, row: Mapping[str, Any]) -> None: ...

    def finish(self) -> None: ...


def _import(module: str, extra: str, key: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{key}.enabled=true needs {module}: pip install 'forge-train[{extra}]' "
            f"(or set {key}.enabled=false)"
        ) from exc


def _numbers(row: Mapping[str, Any]) -> dict[str, float]:
    """The numeric values of a metrics row, without its step (``None``: not measured)."""
    return {
        k: v
        for k, v in row.items()
        if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
    }


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-3}}`` -> ``{"optim.lr": 1e-3}`` (MLflow parameters are flat)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


class WandbTracker:
    """A W&B run: ``wandb.init(config=...)``, ``run.log(row, step=...)``, ``run.finish()``."""

    def __init__(self, config, run_config: Mapping[str, Any], run_dir: Path | None) -> None:
        wandb = _import("wandb", "wandb", "logging.wandb")
        kwargs: dict[str, Any] = {"config": dict(run_config)}
        for key in ("project", "entity", "name"):
            if getattr(config, key) is not None:
                kwargs[key] = getattr(config, key)
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            kwargs["dir"] = str(run_dir)
        self.run = wandb.init(**kwargs)

    def log(self, row: Mapping[str, Any]) -> None:
        values = _numbers(row)
        if values:
            self.run.log(values, step=int(row["step"]))

    def finish(self) -> None:
        self.run.finish()


class MlflowTracker:
    """An MLflow run: the config as (flattened) parameters, metrics by step, ``end_run()``."""

    #: MLflow's limits: parameter values of at most 500 characters in older servers, 100
    #: parameters per ``log_params`` batch.
    MAX_VALUE_CHARS = 500
    BATCH = 100

    def __init__(self, config, run_config: Mapping[str, Any]) -> None:
        self.mlflow = _import("mlflow", "mlflow", "logging.mlflow")
        if config.tracking_uri is not None:
            self.mlflow.set_tracking_uri(config.tracking_uri)
        if config.experiment is not None:
            self.mlflow.set_experiment(config.experiment)
        self.mlflow.start_run(run_name=config.run_name)
        params = {k: str(v)[: self.MAX_VALUE_CHARS] for k, v in flatten(run_config).items()}
        items = list(params.items())
        for i in range(0, len(items), self.BATCH):
            self.mlflow.log_params(dict(items[i : i + self.BATCH]))

    def log(self, row: Mapping[str, Any]) -> None:
        values = _numbers(row)
        if values:
            self.mlflow.log_metrics(values, step=int(row["step"]))

    def finish(self) -> None:
        self.mlflow.end_run()


def build_trackers(
    config: LoggingConfig, run_config: Mapping[str, Any], run_dir: Path | None
) -> list[Tracker]:
    """The enabled trackers, each started with ``run_config`` (call on the main process only)."""
    trackers: list[Tracker] = []
    try:
        if config.wandb.enabled:
            trackers.append(WandbTracker(config.wandb, run_config, run_dir))
        if config.mlflow.enabled:
            trackers.append(MlflowTracker(config.mlflow, run_config))
    except BaseException:
        for tracker in trackers:  # do not leave a started run open
            tracker.finish()
        raise
    return trackers
