"""The non-finite guard skips or stops, naming the step and what was non-finite."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from forge_core.testing import import_path
from forge_train.step import StepRunner
from forge_train.trainer import NonFiniteError, train

tiny = import_path(Path(__file__).with_name("tiny_run.py"), "forge_train_tests_tiny_run")


@pytest.fixture
def nan_loss_at_step_2(monkeypatch):
    original = StepRunner.accumulate
    calls = []

    def poisoned(self, micro_batches):
        loss, norm, tokens = original(self, micro_batches)
        calls.append(len(calls))
        if calls[-1] == 2:  # the third step (0-based step 2)
            loss = torch.tensor(float("nan"))
        return loss, norm, tokens

    monkeypatch.setattr(StepRunner, "accumulate", poisoned)


def _config(tmp_path, policy):
    return tiny.tiny_config(
        tmp_path, "train.steps=4", f"train.nan_policy={policy}", "train.eval_batches=0",
        "checkpoint.export_hf=false", "checkpoint.save_final=false", "checkpoint.interval=0",
    )  # fmt: skip


def test_skip_policy_skips_the_update(tmp_path, nan_loss_at_step_2, capsys):
    result = train(_config(tmp_path, "skip"))
    assert result.skipped_steps == [2]
    assert result.steps_done == 4
    assert "step 2: non-finite loss (nan); update skipped" in capsys.readouterr().out


def test_stop_policy_stops_with_a_report(tmp_path, nan_loss_at_step_2):
    with pytest.raises(NonFiniteError, match=r"step 2: non-finite loss \(nan\); stopping"):
        train(_config(tmp_path, "stop"))
