"""Crash safety: a writer killed with SIGKILL at random points during save never damages the
last complete checkpoint, and a partial one is never picked up.

Each attempt forks a child (``fork`` context: torch is not imported again) that resumes from
the newest complete checkpoint and saves new ones in a loop, with keep-last-2 retention (so
deletions get killed too); once it has completed one save, the parent kills it after a random
delay (so kills land anywhere in save, fsync, marker, rename or delete), then checks that the
newest complete checkpoint loads with exactly the values of its step, and that no step
older than the previously newest one became the newest.

With asynchronous saves (10 more kills) the writer keeps training meanwhile: it changes its
weights in place right after each ``save`` returns, while the background thread still writes
the staged copy, so kills also land in staging and in a write that runs beside training.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time

import pytest
import torch
from torch import nn

from forge_ckpt.training import CheckpointConfig, CheckpointManager, list_checkpoints

ATTEMPTS = {False: 20, True: 10}  # kills of synchronous and of asynchronous savers
NUMEL = 1 << 17  # per tensor; 4 tensors: 2 MiB of weights (+ 4 MiB of AdamW-like moments)


class Payload(nn.Module):
    """Weights whose values encode the step they were saved at."""

    def __init__(self, step: int = -1) -> None:
        super().__init__()
        base = torch.arange(NUMEL, dtype=torch.float32)
        self.weights = nn.ParameterList(nn.Parameter(base + 1000.0 * i + step) for i in range(4))


class Counter:
    def __init__(self, step: int = -1) -> None:
        self.step = step

    def state_dict(self) -> dict:
        return {"step": self.step, "moments": torch.full((2 * NUMEL,), float(self.step))}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        assert torch.equal(state["moments"], torch.full((2 * NUMEL,), float(self.step)))


def _config(directory, async_save: bool = False) -> CheckpointConfig:
    return CheckpointConfig(
        directory=directory, keep_last_n=2, save_rng=False, async_save=async_save
    )


def _writer(directory: str, saved_one, async_save: bool) -> None:
    torch.set_num_threads(1)
    manager = CheckpointManager(_config(directory, async_save))
    latest = manager.latest()
    step = latest.step + 1 if latest is not None else 0
    model = Payload(step)
    while True:
        manager.save(step, model=model, extra={"counter": Counter(step)})
        with torch.no_grad():  # the next step's weights, while step's copy may be written
            for w in model.weights:
                w.add_(1.0)
        if not saved_one.is_set():
            manager.wait()  # one complete save before the parent may kill
            saved_one.set()
        step += 1


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_sigkill_during_save_never_damages_the_last_checkpoint(tmp_path, async_save):
    # Warm up in the parent: the first save imports DCP's lazy dependencies (torch._dynamo,
    # seconds; the async stager), which the forked writers then inherit instead of importing
    # each time. The manager is closed first: no thread is running at the fork.
    with CheckpointManager(_config(tmp_path / "warmup", async_save)) as warmup:
        warmup.save(0, model=Payload(0))
    attempts = ATTEMPTS[async_save]
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(0)
    newest, partial_seen = -1, 0
    for attempt in range(attempts):
        saved_one = ctx.Event()
        args = (str(tmp_path / "run"), saved_one, async_save)
        child = ctx.Process(target=_writer, args=args, daemon=True)
        child.start()
        # kill at a random point of the save loop, after one complete save (so the test
        # does not depend on how fast a busy machine runs the child)
        assert saved_one.wait(timeout=120), f"attempt {attempt}: the writer saved nothing"
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL, f"attempt {attempt}: writer died early"
        names = os.listdir(tmp_path / "run") if (tmp_path / "run").exists() else []
        partial_seen += any(".tmp-" in n or ".deleting-" in n for n in names)

        found = list_checkpoints(tmp_path / "run")
        assert len(found) <= 3  # keep-last-2, plus one being replaced at most
        if not found:
            assert newest == -1, f"attempt {attempt}: checkpoint {newest} was lost"
            continue
        latest = found[-1].step
        assert latest >= newest, f"attempt {attempt}: newest went from {newest} to {latest}"
        newest = latest
        model, counter = Payload(), Counter()
        result = CheckpointManager(_config(tmp_path / "run")).load_latest(
            model=model, extra={"counter": counter}
        )
        assert result.step == latest
        assert counter.step == latest
        base = torch.arange(NUMEL, dtype=torch.float32)
        for i, w in enumerate(model.weights):
            assert torch.equal(w.detach(), base + 1000.0 * i + latest), (attempt, i)
    print(f"newest step {newest}; kills that left a partial folder: {partial_seen}/{attempts}")
    assert newest >= attempts - 1
    assert partial_seen > 0, "no kill landed inside a save: the test did not test crashes"
