"""forge-ckpt's ``CheckpointManager`` on the persistent 2-rank gloo pool (its jobs take well
under a second): per-rank loader states of earlier builds resume on more ranks, a loader whose
state differs between ranks is refused, and a manager of a sub-group of the ranks saves and
loads without the other ranks."""

from __future__ import annotations

from pathlib import Path

import torch

from forge_core.testing import import_path


class _Loader:
    """A loader whose state is a step counter."""

    def __init__(self, step: int = 0) -> None:
        self.step = step

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def _load_on_every_rank(directory: str) -> int:
    from forge_ckpt.training import CheckpointConfig, CheckpointManager

    loader = _Loader()
    with CheckpointManager(CheckpointConfig(directory=directory)) as manager:
        manager.load_latest(model=torch.nn.Linear(2, 2), dataloader=loader)
    return loader.step


def _save_a_per_rank_state(directory: str) -> str:
    import torch.distributed as dist

    from forge_ckpt.training import CheckpointConfig, CheckpointManager

    with CheckpointManager(CheckpointConfig(directory=directory)) as manager:
        try:
            manager.save(1, dataloader=_Loader(dist.get_rank()))
        except ValueError as error:
            return str(error)
    return "saved"


def test_an_earlier_builds_per_rank_loader_state_resumes_on_more_ranks(tmp_path, dist_pool):
    """A checkpoint of one process in the per-rank layout of earlier forge-ckpt builds: both
    ranks of the resuming job restore rank 0's loader state (rank 1 restarted at 0 before)."""
    from forge_ckpt.training import CheckpointConfig, CheckpointManager

    ckpt_tests = Path(__file__).parents[3] / "packages" / "forge-ckpt" / "tests"
    helpers = import_path(ckpt_tests / "test_loader_state.py", "forge_ckpt_tests_loader_state")
    manager = CheckpointManager(CheckpointConfig(directory=tmp_path / "one"))
    helpers.save_in_the_per_rank_layout(
        manager, 6, model=torch.nn.Linear(2, 2), dataloader=_Loader(6)
    )
    assert dist_pool(2).run(_load_on_every_rank, str(tmp_path / "one")) == [6, 6]
    # and a loader whose state differs between ranks is refused on every rank
    errors = dist_pool(2).run(_save_a_per_rank_state, str(tmp_path / "skewed"))
    assert all("state differs between ranks (ranks [1] differ" in e for e in errors), errors


def _rank_zero_alone(directory: str) -> list[float]:
    """Rank 0 saves and loads with a group of itself (sync, then async); rank 1 does not."""
    import torch.distributed as dist

    from forge_ckpt.training import CheckpointConfig, CheckpointManager

    solo = dist.new_group([0])
    if dist.get_rank() != 0:
        return []
    torch.manual_seed(0)
    model, restored = torch.nn.Linear(2, 2), []
    for async_save in (False, True):
        config = CheckpointConfig(directory=f"{directory}/{async_save}", async_save=async_save)
        with CheckpointManager(config, process_group=solo) as manager:
            manager.save(1, model=model, dataloader=_Loader(1))
            other = torch.nn.Linear(2, 2)
            manager.load(1, model=other, dataloader=_Loader())
            restored.append(float((other.weight - model.weight).abs().max()))
    dist.destroy_process_group(solo)
    return restored


def test_a_manager_of_a_sub_group_needs_no_other_rank(tmp_path, dist_pool):
    """Loading was collective over the whole world (it hung while rank 1 did other work)."""
    ranks = dist_pool(2).run(_rank_zero_alone, str(tmp_path), timeout=60)
    assert ranks == [[0.0, 0.0], []]
