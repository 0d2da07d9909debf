"""A damaged checkpoint folder is skipped on resume with a warning that says why, and kept."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

from forge_ckpt.training import CheckpointConfig, CheckpointManager
from forge_ckpt.training.layout import MARKER, check_folder

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

_LOGGER = "forge_ckpt.training.manager"


def _saved(tmp_path, steps) -> tuple[CheckpointManager, nn.Module]:
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    manager = CheckpointManager(CheckpointConfig(directory=tmp_path, save_rng=False))
    for step in steps:
        manager.save(step, model=model)
    return manager, model


def _listed_size(folder, name: str) -> int:
    files = json.loads((folder / MARKER).read_text())["files"]
    return next(f["size"] for f in files if f["name"] == name)


def test_damaged_newest_checkpoints_are_reported_and_kept(tmp_path, caplog):
    manager, model = _saved(tmp_path, (2, 3, 4))
    truncated, no_metadata = tmp_path / "step_00000003", tmp_path / "step_00000004"
    size = _listed_size(truncated, "__0_0.distcp")
    with open(truncated / "__0_0.distcp", "r+b") as f:
        f.truncate(100)
    (no_metadata / ".metadata").unlink()

    with caplog.at_level(logging.WARNING, logger=_LOGGER):
        result = manager.load_latest(model=model)
    assert result.step == 2
    warnings = [r.getMessage() for r in caplog.records if r.name == _LOGGER]
    assert len(warnings) == 2, warnings
    assert str(truncated) in warnings[0]
    assert f"__0_0.distcp is 100 bytes, the manifest says {size}" in warnings[0]
    assert str(no_metadata) in warnings[1]
    assert ".metadata is missing" in warnings[1]
    assert all("resuming from" in w and "step_00000002 (step 2)" in w for w in warnings)
    # left in place, untouched
    assert (truncated / "__0_0.distcp").stat().st_size == 100
    assert (no_metadata / MARKER).is_file()

    # Asked for by step, the error says what is wrong too.
    with pytest.raises(FileNotFoundError, match=r"\.metadata is missing"):
        manager.load(4, model=model)


def test_no_complete_checkpoint_left_says_the_run_starts_over(tmp_path, caplog):
    manager, model = _saved(tmp_path, (5,))
    (tmp_path / "step_00000005" / MARKER).unlink()
    with caplog.at_level(logging.WARNING, logger=_LOGGER):
        assert manager.load_latest(model=model) is None
    (message,) = [r.getMessage() for r in caplog.records if r.name == _LOGGER]
    assert f"no {MARKER}" in message
    assert "starting from scratch" in message


def test_an_older_damaged_folder_is_not_reported(tmp_path, caplog):
    """Only folders newer than the one resumed are skipped over; older ones change nothing."""
    manager, model = _saved(tmp_path, (1, 2))
    (tmp_path / "step_00000001" / ".metadata").unlink()
    with caplog.at_level(logging.WARNING, logger=_LOGGER):
        assert manager.load_latest(model=model).step == 2
    assert not [r for r in caplog.records if r.name == _LOGGER]


def test_check_folder_reasons(tmp_path):
    _saved(tmp_path, (7,))
    folder = tmp_path / "step_00000007"
    assert check_folder(folder)[0]["step"] == 7
    manifest = json.loads((folder / MARKER).read_text())
    (folder / MARKER).write_text(json.dumps({**manifest, "step": 8}))
    assert "of step 8" in check_folder(folder)[1]
    assert check_folder(folder, named=False)[0] is not None  # a copy given by path
    (folder / MARKER).write_text("{not json")
    assert "cannot be read as JSON" in check_folder(folder)[1]
