"""Training checkpoints in one process: exact resume, async = sync, retention, leftovers,
wrong-model errors and pickle safety (forge_ckpt.training)."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from forge_ckpt.errors import CheckpointMismatchError
from forge_ckpt.training import CheckpointConfig, CheckpointManager
from forge_ckpt.training.layout import MARKER
from forge_ckpt.training.safe_reader import SafeFileSystemReader, read_metadata


class Net(nn.Module):
    def __init__(self, dim: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.drop = nn.Dropout(0.1)  # draws from torch's RNG: resume must restore it
        self.down = nn.Linear(hidden, dim)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.drop(torch.relu(self.up(x)))) * self.scale


class Loader:
    """A data loader whose position and shuffle buffer are checkpointed."""

    def __init__(self) -> None:
        self.position = 0
        self.buffer = torch.zeros(3)
        self.meta = {"epoch": 0, "order": (2, 0, 1), 7: "int key"}

    def next_batch(self) -> torch.Tensor:
        self.position += 1
        self.buffer += 1
        # numpy and Python RNG also feed the batch: resume must restore them
        noise = float(np.random.rand()) + random.random()
        return torch.randn(4, 8) + self.buffer.sum() * 1e-3 + noise

    def state_dict(self) -> dict:
        return {"position": self.position, "buffer": self.buffer.clone(), "meta": self.meta}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.buffer, self.meta = state["position"], state["buffer"], state["meta"]


def _build(seed: int = 0, **net):
    torch.manual_seed(seed)
    model = Net(**net)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    return model, opt, sched, Loader()


def _step(model, opt, sched, loader) -> float:
    loss = model(loader.next_batch()).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    sched.step()
    return loss.item()


def _read_all(path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, read back through the safe reader."""
    metadata = read_metadata(path)
    out = {
        k: torch.empty(tuple(md.size), dtype=md.properties.dtype)
        for k, md in metadata.state_dict_metadata.items()
    }
    dcp.load(out, storage_reader=SafeFileSystemReader(path), no_dist=True)
    return out


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_round_trip_resumes_exactly(tmp_path):
    model, opt, sched, loader = _build()
    for _ in range(3):
        _step(model, opt, sched, loader)
    manager = CheckpointManager(CheckpointConfig(directory=tmp_path, interval=3))
    assert manager.should_save(3)
    assert not manager.should_save(4)
    assert manager.load_latest(model=model) is None
    path = manager.save(3, model=model, optimizer=opt, scheduler=sched, dataloader=loader)
    assert path == tmp_path / "step_00000003"
    assert (path / MARKER).is_file()
    lr = opt.param_groups[0]["lr"]
    expected = [_step(model, opt, sched, loader) for _ in range(3)]

    model2, opt2, sched2, loader2 = _build(seed=1)  # other weights, fresh optimizer
    random.seed(5), np.random.seed(5), torch.manual_seed(5)  # other RNG states
    result = manager.load_latest(model=model2, optimizer=opt2, scheduler=sched2, dataloader=loader2)
    assert result.step == 3
    assert result.world_size == 1
    assert set(result.restored) == {"scheduler", "dataloader", "rng"}
    assert loader2.position == 3
    assert loader2.meta == {"epoch": 0, "order": (2, 0, 1), 7: "int key"}
    assert sched2.last_epoch == 3
    assert opt2.param_groups[0]["lr"] == lr == 1e-2 / 4
    got = [_step(model2, opt2, sched2, loader2) for _ in range(3)]
    assert got == expected  # bit-identical: weights, moments, lr schedule, data, RNG


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_async_save_equals_sync_save(tmp_path):
    model, opt, sched, loader = _build()
    _step(model, opt, sched, loader)
    state = {"model": model, "optimizer": opt, "scheduler": sched, "dataloader": loader}
    sync = CheckpointManager(CheckpointConfig(directory=tmp_path / "sync"))
    sync.save(1, **state)
    with CheckpointManager(CheckpointConfig(directory=tmp_path / "async", async_save=True)) as m:
        m.save(1, **state)
        # training goes on while the checkpoint is written: it must not leak into it
        for _ in range(2):
            _step(model, opt, sched, loader)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    a, b = (
        _read_all(tmp_path / "sync" / "step_00000001"),
        _read_all(tmp_path / "async" / "step_00000001"),
    )
    assert sorted(a) == sorted(b)
    assert len(a) > 10
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key
    assert any(k.startswith("optim/state.") for k in a)
    assert "model/up.weight" in a


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_keep_last_n_and_leftovers(tmp_path):
    model, opt, _sched, _loader = _build()
    manager = CheckpointManager(CheckpointConfig(directory=tmp_path, keep_last_n=2))
    for step in (10, 20, 30):
        manager.save(step, model=model, optimizer=opt)
    assert [c.step for c in manager.checkpoints()] == [20, 30]
    assert sorted(os.listdir(tmp_path)) == ["step_00000020", "step_00000030"]

    # Leftovers of crashes: a tmp folder with a valid-looking marker, a step folder without
    # marker, one whose file lost bytes, one whose marker names another step: all ignored.
    good = tmp_path / "step_00000030"
    shutil.copytree(good, tmp_path / "step_00000040.tmp-deadbeef")
    shutil.copytree(good, tmp_path / "step_00000050")
    (tmp_path / "step_00000050" / MARKER).unlink()
    shutil.copytree(good, tmp_path / "step_00000060")
    with open(tmp_path / "step_00000060" / "__0_0.distcp", "r+b") as f:
        f.truncate(100)
    shutil.copytree(good, tmp_path / "step_00000070")
    assert [c.step for c in manager.checkpoints()] == [20, 30]
    assert manager.load_latest(model=model).step == 30

    manager.save(80, model=model, optimizer=opt)  # removes tmp leftovers, keeps 2 complete
    names = sorted(os.listdir(tmp_path))
    assert not any(".tmp-" in n or ".deleting-" in n for n in names), names
    assert [c.step for c in manager.checkpoints()] == [30, 80]
    # saving an existing step again replaces it
    manager.save(80, model=model)
    assert [c.step for c in manager.checkpoints()] == [30, 80]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_checkpoint_of_another_model_is_refused(tmp_path):
    model, opt, *_ = _build()
    manager = CheckpointManager(CheckpointConfig(directory=tmp_path, save_rng=False))
    manager.save(1, model=model, optimizer=opt)

    other = nn.ModuleDict({"up": nn.Linear(8, 32), "extra": nn.Linear(2, 2)})  # no "down"
    with pytest.raises(CheckpointMismatchError) as info:
        manager.load(1, model=other)
    message = str(info.value)
    assert "missing from the checkpoint (2)" in message
    assert "model/extra.weight" in message
    assert "unexpected in the checkpoint (3)" in message
    assert "model/down.weight" in message
    assert "mis-shaped (2)" in message
    assert "model/up.weight: checkpoint [16, 8], model expects [32, 8]" in message
    assert info.value.mismatched[0][0] == "model/up.bias"

    # saved without optimizer, loaded with one: says so
    manager.save(2, model=model)
    with pytest.raises(CheckpointMismatchError, match="holds no optimizer state"):
        manager.load(2, model=model, optimizer=opt)
    with pytest.raises(ValueError, match="holds no state for 'scheduler'"):
        manager.load(2, model=model, scheduler=_build()[2])
    with pytest.raises(FileNotFoundError, match=r"complete checkpoints in .*: \[1, 2\]"):
        manager.load(3, model=model)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_optional_extras_load_where_present_and_unasked_state_is_reported(tmp_path):
    """``optional_extra``: state only some runs save (forge-train's fp16 loss scale) loads where
    the checkpoint holds it and is listed in ``not_in_checkpoint`` where it does not; what the
    checkpoint holds but the load did not ask for is listed in ``unread``."""
    model, _, sched, _ = _build()
    manager = CheckpointManager(CheckpointConfig(directory=tmp_path, save_rng=False))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    manager.save(1, model=model, scheduler=sched)
    manager.save(2, model=model, scheduler=sched, extra={"loss_scaler": scaler})

    fresh = torch.amp.GradScaler("cpu")
    without = manager.load(1, model=model, optional_extra={"loss_scaler": fresh})
    assert (without.not_in_checkpoint, without.unread) == (("loss_scaler",), ("scheduler",))
    assert fresh.get_scale() == 2.0**16  # left as it was
    with_it = manager.load(2, model=model, scheduler=sched, optional_extra={"loss_scaler": fresh})
    assert (with_it.restored, with_it.not_in_checkpoint) == (("scheduler", "loss_scaler"), ())
    assert fresh.get_scale() == 2.0**20
    assert manager.load(2, model=model).unread == ("loss_scaler", "scheduler")
    with pytest.raises(ValueError, match="holds no state for 'loss_scaler'"):
        manager.load(1, model=model, extra={"loss_scaler": fresh})
    with pytest.raises(ValueError, match="both as extra and as optional_extra"):
        manager.load(2, model=model, extra={"s": fresh}, optional_extra={"s": fresh})


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_loading_never_unpickles_code(tmp_path):
    model, *_ = _build()
    manager = CheckpointManager(CheckpointConfig(directory=tmp_path))
    path = manager.save(1, model=model)
    evil = pickle.dumps(_Evil())
    (path / ".metadata").write_bytes(evil)
    manifest = json.loads((path / MARKER).read_text())  # keep the marker consistent
    for entry in manifest["files"]:
        if entry["name"] == ".metadata":
            entry["size"] = len(evil)
    (path / MARKER).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"refusing to load posix\.system"):
        manager.load(1, model=model)
    # non-tensor state that is not JSON-able is refused at save time, not pickled
    with pytest.raises(TypeError, match=r"cannot checkpoint object at 'bad/x'"):
        manager.save(2, extra={"bad": _Holder({"x": object()})})


class _Holder:
    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = state


def test_config_is_validated(tmp_path):
    with pytest.raises(ValueError, match="keep_last_n must be a positive integer"):
        CheckpointConfig(directory=tmp_path, keep_last_n=0)
    with pytest.raises(ValueError, match="interval must be an integer >= 0"):
        CheckpointConfig(directory=tmp_path, interval=-5)
    with pytest.raises(ValueError, match="directory must be a non-empty path"):
        CheckpointConfig(directory="")
    with pytest.raises(TypeError):
        CheckpointConfig(tmp_path)  # keyword-only
