"""What a load and a save check beyond names and shapes: the two stored names of a tied
parameter must hold the same tensor (an untied model's checkpoint does not load into a tied
model); tensors cast to another dtype are logged; a copy of a checkpoint under another folder
name loads by path; a save of an earlier step sets the later (abandoned) checkpoints aside."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from torch import nn

from forge_ckpt import CheckpointMismatchError
from forge_ckpt.training import CheckpointConfig, CheckpointManager

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class TinyLM(nn.Module):
    def __init__(self, *, tied: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, 4)
        self.head = nn.Linear(4, 8, bias=False)
        if tied:
            self.head.weight = self.embed.weight


def test_an_untied_checkpoint_is_refused_by_a_tied_model(tmp_path):
    manager = CheckpointManager(CheckpointConfig(directory=tmp_path))
    manager.save(1, model=TinyLM(tied=False))
    with pytest.raises(CheckpointMismatchError, match=r"'model/head\.weight' and 'model/embed"):
        manager.load(1, model=TinyLM(tied=True))


def test_a_tied_checkpoint_loads_tied_and_untied(tmp_path):
    manager = CheckpointManager(CheckpointConfig(directory=tmp_path))
    saved = TinyLM(tied=True)
    manager.save(1, model=saved)
    for tied in (True, False):
        model = TinyLM(tied=tied)
        manager.load(1, model=model)
        assert torch.equal(model.embed.weight, saved.embed.weight)
        assert torch.equal(model.head.weight, saved.embed.weight)


def _ours(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("forge_ckpt")]


def test_tensors_cast_to_another_dtype_are_logged(tmp_path, caplog):
    manager = CheckpointManager(CheckpointConfig(directory=tmp_path))
    manager.save(1, model=nn.Linear(4, 4))
    with caplog.at_level(logging.WARNING, logger="forge_ckpt"):
        manager.load(1, model=nn.Linear(4, 4))
        assert not _ours(caplog)
        manager.load(1, model=nn.Linear(4, 4).to(torch.bfloat16))
    (record,) = _ours(caplog)
    assert "2 tensors are cast" in record.message
    assert "model/weight (float32 -> bfloat16)" in record.message


def test_a_copy_under_another_name_loads_by_path(tmp_path):
    manager = CheckpointManager(CheckpointConfig(directory=tmp_path / "run"))
    saved = nn.Linear(2, 2)
    manager.save(100, model=saved)
    shutil.copytree(tmp_path / "run" / "step_00000100", tmp_path / "best")
    model = nn.Linear(2, 2)
    assert manager.load(tmp_path / "best", model=model).step == 100
    assert torch.equal(model.weight, saved.weight)
    assert [info.step for info in manager.checkpoints()] == [100]  # not listed by step


def test_saving_an_earlier_step_sets_the_abandoned_branch_aside(tmp_path, caplog):
    manager = CheckpointManager(CheckpointConfig(directory=tmp_path, keep_last_n=2))
    model = nn.Linear(2, 2)
    for step in (2, 4, 6):
        manager.save(step, model=model)
    manager.load(4, model=model)  # back to step 4 (a loss spike at 6), train, save 5
    with caplog.at_level(logging.WARNING, logger="forge_ckpt"):
        manager.save(5, model=model)
    assert [info.step for info in manager.checkpoints()] == [4, 5]
    assert manager.load_latest(model=model).step == 5
    assert (tmp_path / "abandoned" / "step_00000006").is_dir()  # kept, never deleted
    (record,) = _ours(caplog)
    assert "moved to" in record.message
    assert "step_00000006" in record.message
    assert manager.load(tmp_path / "abandoned" / "step_00000006", model=model).step == 6
