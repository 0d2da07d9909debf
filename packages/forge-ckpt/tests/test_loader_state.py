"""The data loader's state is stored once (a global object, the same on every rank); checkpoints
of earlier builds, which stored it per rank, still resume it (rank 0's state on every rank); a
checkpoint without it is refused where one is asked for."""

from __future__ import annotations

import pytest
import torch

from forge_ckpt.training import CheckpointConfig, CheckpointManager
from forge_ckpt.training.dcp_state import TrainingState
from forge_ckpt.training.safe_reader import read_metadata

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class CountingLoader:
    """A loader whose whole state is the number of batches it has given."""

    def __init__(self, step: int = 0) -> None:
        self.step = step

    def state_dict(self) -> dict:
        return {"step": self.step, "order": torch.arange(4) + self.step}

    def load_state_dict(self, state: dict) -> None:
        assert torch.equal(state["order"], torch.arange(4) + state["step"])
        self.step = int(state["step"])


def save_in_the_per_rank_layout(manager: CheckpointManager, step: int, **objects) -> None:
    """Save as earlier forge-ckpt builds did: the data loader under ``rank_XXXXX/``."""
    build = manager._state

    def per_rank_loader(*args, **kwargs) -> TrainingState:
        state = build(*args, **kwargs)
        global_objects = dict(state.global_objects)
        loader = global_objects.pop("dataloader")
        return TrainingState(
            model=state.model,
            optimizers=state.optimizers,
            global_objects=global_objects,
            rank_objects={"dataloader": loader, **state.rank_objects},
        )

    manager._state = per_rank_loader
    try:
        manager.save(step, **objects)
    finally:
        del manager._state


def test_loader_state_is_stored_once_and_restored(tmp_path):
    manager = CheckpointManager(CheckpointConfig(directory=tmp_path))
    manager.save(5, model=torch.nn.Linear(2, 2), dataloader=CountingLoader(5))
    loader = CountingLoader()
    result = manager.load(5, model=torch.nn.Linear(2, 2), dataloader=loader)
    assert loader.step == 5
    assert result.restored == ("dataloader", "rng")
    keys = read_metadata(tmp_path / "step_00000005").state_dict_metadata
    assert "dataloader/step" not in keys  # a plain int: in the JSON document
    assert "dataloader/order" in keys
    assert not any(k.startswith("rank_00000/data") for k in keys)


def test_a_per_rank_loader_checkpoint_of_an_earlier_build_resumes(tmp_path):
    manager = CheckpointManager(CheckpointConfig(directory=tmp_path))
    save_in_the_per_rank_layout(
        manager, 7, model=torch.nn.Linear(2, 2), dataloader=CountingLoader(7)
    )
    keys = read_metadata(tmp_path / "step_00000007").state_dict_metadata
    assert "rank_00000/dataloader/order" in keys
    loader = CountingLoader()
    result = manager.load_latest(model=torch.nn.Linear(2, 2), dataloader=loader)
    assert loader.step == 7
    assert "dataloader" in result.restored
    assert result.not_in_checkpoint == ()


def test_a_checkpoint_without_loader_state_is_refused_for_a_loader(tmp_path):
    manager = CheckpointManager(CheckpointConfig(directory=tmp_path))
    manager.save(3, model=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="holds no state for 'dataloader'"):
        manager.load(3, model=torch.nn.Linear(2, 2), dataloader=CountingLoader())


def test_a_loader_given_twice_is_refused(tmp_path):
    manager = CheckpointManager(CheckpointConfig(directory=tmp_path))
    with pytest.raises(ValueError, match="'dataloader' given both"):
        manager.save(1, dataloader=CountingLoader(), extra={"dataloader": CountingLoader()})
