"""Crash safety of a distributed save: two gloo ranks saving one sharded training checkpoint
through ``CheckpointManager`` (DCP), one rank or both SIGKILLed at random points during save,
never damage the last complete checkpoint, and a partial one is never picked up.

Each attempt forks both ranks from the test process (``fork``: torch and DCP's lazy imports are
not loaded again) with a fresh ``FileStore``; they resume from the newest complete checkpoint
and save new ones in a loop, keep-last-2 retention, with DTensor weights sharded over the two
ranks (``Shard(0)``: each rank writes its half). Once both ranks have completed one save, the
test kills rank 0, rank 1 or both (in turn) after a random delay, so kills land in a rank's
write, in DCP's collectives, in rank 0's marker, rename or retention while rank 1 has finished,
or the other way round; the surviving rank, if any, goes on until its collective fails or it
is killed too. Then the newest complete checkpoint loads in one process (resharded to full
tensors) with exactly the values of its step, and no step older than the previously newest one
became the newest.
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

ATTEMPTS = 8
WORLD = 2
NUMEL = 1 << 16  # per tensor; 4 tensors: 1 MiB of weights (+ 1 MiB of replicated moments)
VICTIMS = ((0,), (1,), (0, 1))  # killed ranks, in turn


def _weights(step: int) -> list[torch.Tensor]:
    base = torch.arange(NUMEL, dtype=torch.float32)
    return [base + 1000.0 * i + step for i in range(4)]


class ShardedPayload(nn.Module):
    """Weights whose values encode the step they were saved at; DTensors sharded over ``mesh``
    (full tensors without one)."""

    def __init__(self, step: int = -1, mesh=None) -> None:
        super().__init__()
        weights = _weights(step)
        if mesh is not None:
            from torch.distributed.tensor import Shard, distribute_tensor

            weights = [distribute_tensor(w, mesh, [Shard(0)]) for w in weights]
        self.weights = nn.ParameterList(nn.Parameter(w) for w in weights)


class Counter:
    def __init__(self, step: int = -1) -> None:
        self.step = step

    def state_dict(self) -> dict:
        return {"step": self.step, "moments": torch.full((NUMEL,), float(self.step))}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        assert torch.equal(state["moments"], torch.full((NUMEL,), float(self.step)))


def _config(directory) -> CheckpointConfig:
    return CheckpointConfig(directory=directory, keep_last_n=2, save_rng=False)


def _writer(rank: int, store_file: str, directory: str, saved_one) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    store = dist.FileStore(store_file, WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    manager = CheckpointManager(_config(directory))
    latest = manager.latest()
    step = latest.step + 1 if latest is not None else 0
    while True:
        model = ShardedPayload(step, mesh)
        manager.save(step, model=model, extra={"counter": Counter(step)})
        saved_one.set()
        step += 1


@pytest.mark.multiprocess
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_sigkill_of_distributed_savers_never_damages_the_last_checkpoint(tmp_path):
    # Warm up in the parent (DCP's lazy imports), without a process group: the forked ranks
    # inherit the imports and create their own group.
    with CheckpointManager(_config(tmp_path / "warmup")) as warmup:
        warmup.save(0, model=ShardedPayload(0))
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(0)
    run = tmp_path / "run"
    newest, partial_seen, survivor_errors = -1, 0, 0
    for attempt in range(ATTEMPTS):
        events = [ctx.Event() for _ in range(WORLD)]
        store = str(tmp_path / f"store-{attempt}")
        ranks = [
            ctx.Process(target=_writer, args=(r, store, str(run), events[r]), daemon=True)
            for r in range(WORLD)
        ]
        for p in ranks:
            p.start()
        for r, event in enumerate(events):
            assert event.wait(timeout=120), f"attempt {attempt}: rank {r} saved nothing"
        time.sleep(rng.uniform(0.0, 0.3))
        victims = VICTIMS[attempt % len(VICTIMS)]
        for r in victims:
            os.kill(ranks[r].pid, signal.SIGKILL)
        for r, p in enumerate(ranks):
            if r not in victims:
                p.join(timeout=rng.uniform(0.0, 0.5))  # the survivor runs on a little
                if p.is_alive():
                    os.kill(p.pid, signal.SIGKILL)
                else:
                    survivor_errors += 1  # its collective failed: it raised and exited
            p.join()
            assert p.exitcode != 0, f"attempt {attempt}: rank {r} ended cleanly"
        names = os.listdir(run) if run.exists() else []
        partial_seen += any(".tmp-" in n or ".deleting-" in n for n in names)

        found = list_checkpoints(run)
        assert found, f"attempt {attempt}: no complete checkpoint (each rank had saved one)"
        assert len(found) <= 3  # keep-last-2, plus one being replaced at most
        latest = found[-1].step
        assert latest >= newest, f"attempt {attempt}: newest went from {newest} to {latest}"
        newest = latest
        model, counter = ShardedPayload(), Counter()
        result = CheckpointManager(_config(run)).load_latest(
            model=model, extra={"counter": counter}
        )
        assert result.step == latest
        assert counter.step == latest
        for i, (w, want) in enumerate(zip(model.weights, _weights(latest), strict=True)):
            assert torch.equal(w.detach(), want), (attempt, i)
    print(
        f"newest step {newest}; kills that left a partial folder: {partial_seen}/{ATTEMPTS}; "
        f"survivors that failed on their own: {survivor_errors}"
    )
    assert newest >= ATTEMPTS - 1
    assert partial_seen > 0, "no kill landed inside a save: the test did not test crashes"
