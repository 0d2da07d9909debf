"""W&B and MLflow get the config once, every metrics row by step, and a finish call; a missing
package names the extra to install."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from forge_core.testing import import_path
from forge_train.config import LoggingConfig, MlflowConfig, WandbConfig
from forge_train.metrics import MetricsLogger

fakes = import_path(Path(__file__).with_name("fake_trackers.py"), "forge_train_tests_fakes")

RUN_CONFIG = {"optim": {"lr": 0.01, "betas": [0.9, 0.95]}, "lora": None, "model": {"config": {}}}
PARAMS = {"optim.lr": "0.01", "optim.betas": "[0.9, 0.95]", "lora": "None", "model.config": "{}"}


def _logger(tmp_path, **trackers) -> MetricsLogger:
    config = LoggingConfig(progress="plain", tensorboard="false", **trackers)
    return MetricsLogger(config, tmp_path, enabled=True, run_config=RUN_CONFIG)


def test_wandb_gets_config_once_rows_by_step_and_finish(tmp_path, monkeypatch):
    wandb = fakes.fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    log = _logger(tmp_path, wandb=WandbConfig(enabled=True, project="p", name="run-1"))
    log.log({"step": 5, "loss": 2.5, "lr": 1e-3, "mfu": None, "tokens": 640}, show=False)
    log.log({"step": 5, "eval_loss": 2.75}, show=False)
    log.close()
    assert wandb.calls == [
        ("init", {"config": RUN_CONFIG, "project": "p", "name": "run-1", "dir": str(tmp_path)}),
        ("log", {"loss": 2.5, "lr": 1e-3, "tokens": 640}, 5),  # mfu=None is not logged
        ("log", {"eval_loss": 2.75}, 5),
        ("finish",),
    ]


def test_mlflow_gets_flat_params_once_metrics_by_step_and_end_run(tmp_path, monkeypatch):
    mlflow = fakes.fake_mlflow()
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    config = MlflowConfig(enabled=True, tracking_uri="http://mlflow:5000", experiment="e")
    log = _logger(tmp_path, mlflow=config)
    log.log({"step": 10, "loss": 1.5, "grad_norm": 0.25}, show=False)
    log.close()
    log.close()  # closing twice finishes once
    assert mlflow.calls == [
        ("set_tracking_uri", ("http://mlflow:5000",), {}),
        ("set_experiment", ("e",), {}),
        ("start_run", (), {"run_name": None}),
        ("log_params", (PARAMS,), {}),
        ("log_metrics", {"loss": 1.5, "grad_norm": 0.25}, 10),
        ("end_run", (), {}),
    ]


def test_missing_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'forge-train\[wandb\]'"):
        _logger(tmp_path, wandb=WandbConfig(enabled=True))
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ImportError, match=r"logging.mlflow.enabled=true needs mlflow"):
        _logger(tmp_path, mlflow=MlflowConfig(enabled=True))


def test_a_run_reports_every_row_to_both_trackers(reported_run):
    result, wandb, mlflow = reported_run
    (init,) = [c for c in wandb.calls if c[0] == "init"]
    assert init[1]["project"] == "forge-tests"
    assert init[1]["config"]["train"]["steps"] == 4  # the resolved run config
    logged = [(c[2], sorted(c[1])) for c in wandb.calls if c[0] == "log"]
    train_steps = [step for step, keys in logged if "loss" in keys]
    assert train_steps == [1, 2, 3, 4]
    assert [step for step, keys in logged if keys == ["eval_loss"]] == [2, 4]
    assert wandb.calls[-1] == ("finish",)
    assert [c[0] for c in mlflow.calls].count("start_run") == 1
    params = {k: v for c in mlflow.calls if c[0] == "log_params" for k, v in c[1][0].items()}
    assert params["train.steps"] == "4"
    assert [c[2] for c in mlflow.calls if c[0] == "log_metrics"] == [1, 2, 2, 3, 4, 4]
    assert mlflow.calls[-1][0] == "end_run"
    losses = [c[1]["loss"] for c in wandb.calls if c[0] == "log" and "loss" in c[1]]
    assert losses == result.losses
